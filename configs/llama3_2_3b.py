"""Llama-3.2-3B from a local Hugging Face folder, with the reference's LoRA settings.

The reference adapts the FFN of the upper half of the decoder (layers 14-27 of 28,
r=8, lora_alpha=16). Weights are never downloaded: pass the folder
(config.json, *.safetensors, tokenizer.json) in the config argument:

  python -m launch.generate --config=configs/llama3_2_3b.py:path=/models/Llama-3.2-3B-Instruct
"""
from configs import common


def get_config(arg=None):
  opts = common.parse_arg(arg, path="", dtype="bfloat16")
  c = common.base()
  c.model.source = "hf"
  c.model.path = opts.path
  # bfloat16 compute for GPU/TPU (params stay float32); pass dtype=float32 on CPU.
  c.model.dtype = opts.dtype
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.layers = (14, 28)  # layers 14-27.
  return c
