"""The Llama-family decoder (Flax linen, pure apply), LoRA trees, generation, weight loading."""
from regrad_jax.model.config import ModelConfig, tiny_config
from regrad_jax.model.decode import generate
from regrad_jax.model.lora import LoraConfig, init_lora, merge_into_base
from regrad_jax.model.losses import answer_loss, lm_loss
from regrad_jax.model.transformer import apply, init_params, param_shapes
from regrad_jax.model.loaders import Model, base_fingerprint, load_gguf, load_hf, load_model
