"""Llama 3 (1B, 3B, 8B) from a local Hugging Face folder, with the reference's LoRA settings.

The reference adapts the FFN of the upper half of the decoder: layers 8-15 of 16
(1B: r=16, lora_alpha=32), 14-27 of 28 (3B: r=8, alpha=16), 16-31 of 32 (8B: r=4,
alpha=8). Weights are never downloaded: pass the folder (config.json,
*.safetensors, tokenizer.json) in the config argument:

  python -m launch.generate --config=configs/llama3.py:variant=1b,path=/models/Llama-3.2-1B-Instruct

Options: variant=1b|3b|8b, path=FOLDER, dtype=bfloat16|float32 (float32 on CPU).
"""
from configs import common

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_COMMON = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
           "vocab_size": 128256, "num_key_value_heads": 8, "rope_theta": 500000.0,
           "rms_norm_eps": 1e-5, "max_position_embeddings": 131072}
# Each variant's config.json architecture fields (the released Instruct models):
# what the folder at `path` holds; the config test builds the param shapes from
# them with jax.eval_shape, so no weights are needed to check a variant's layout.
ARCHITECTURES = {
    "1b": {**_COMMON, "hidden_size": 2048, "intermediate_size": 8192,
           "num_hidden_layers": 16, "num_attention_heads": 32, "head_dim": 64,
           "tie_word_embeddings": True, "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0}},
    "3b": {**_COMMON, "hidden_size": 3072, "intermediate_size": 8192,
           "num_hidden_layers": 28, "num_attention_heads": 24, "head_dim": 128,
           "tie_word_embeddings": True, "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0}},
    "8b": {**_COMMON, "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "head_dim": 128,
           "tie_word_embeddings": False, "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0}},
}
# variant -> (LoRA rank, lora_alpha, adapted layers [start, stop)).
_LORA = {"1b": (16, 32.0, (8, 16)), "3b": (8, 16.0, (14, 28)), "8b": (4, 8.0, (16, 32))}


def get_config(arg=None):
  opts = common.parse_arg(arg, "configs/llama3.py", variant="1b", path="",
                          dtype="bfloat16")
  if opts.variant not in _LORA:
    raise ValueError(f"configs/llama3.py: unknown variant {opts.variant!r}; "
                     f"choose one of {sorted(_LORA)}")
  c = common.base()
  c.model.source = "hf"
  c.model.path = opts.path
  # bfloat16 compute for GPU/TPU (params stay float32); pass dtype=float32 on CPU.
  c.model.dtype = opts.dtype
  c.lora.rank, c.lora.alpha, c.lora.layers = _LORA[opts.variant]
  return c
