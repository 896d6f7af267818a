"""Llama-3.1-8B from a local Hugging Face folder, with the reference's LoRA settings.

The reference adapts the FFN of the upper half of the decoder (layers 16-31 of 32,
r=4, lora_alpha=8). Weights are never downloaded: pass the folder
(config.json, *.safetensors, tokenizer.json) in the config argument:

  python -m launch.generate --config=configs/llama3_1_8b.py:path=/models/Llama-3.1-8B-Instruct
"""
from configs import common


def get_config(arg=None):
  opts = common.parse_arg(arg, path="", dtype="bfloat16")
  c = common.base()
  c.model.source = "hf"
  c.model.path = opts.path
  # bfloat16 compute for GPU/TPU (params stay float32); pass dtype=float32 on CPU.
  c.model.dtype = opts.dtype
  c.lora.rank = 4
  c.lora.alpha = 8.0
  c.lora.layers = (16, 32)  # layers 16-31.
  return c
