"""Llama-3.2-1B from a local Hugging Face folder, with the reference's LoRA settings.

The reference adapts the FFN of the upper half of the decoder (layers 8-15 of 16,
r=16, lora_alpha=32). Weights are never downloaded: pass the folder
(config.json, *.safetensors, tokenizer.json) in the config argument:

  python -m launch.generate --config=configs/llama3_2_1b.py:path=/models/Llama-3.2-1B-Instruct
"""
from configs import common


def get_config(arg=None):
  opts = common.parse_arg(arg, path="", dtype="bfloat16")
  c = common.base()
  c.model.source = "hf"
  c.model.path = opts.path
  # bfloat16 compute for GPU/TPU (params stay float32); pass dtype=float32 on CPU.
  c.model.dtype = opts.dtype
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.layers = (8, 16)  # layers 8-15.
  return c
