"""SmolLM2-135M-Instruct, the real model that runs on a CPU (GGUF from PyPI).

  python -m launch.generate --config=configs/smollm2_135m.py
"""
from configs import common


def get_config(arg=None):
  common.parse_arg(arg, "configs/smollm2_135m.py")  # No options.
  c = common.base()
  c.model.source = "smollm2_135m"  # registry.fetch + load_gguf (dequantized fp32).
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.layers = (15, 30)  # Upper half of the 30 layers.
  return c
