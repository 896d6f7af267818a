"""Stage 1 of ReGrad: meta-learn theta* (a LoRA point) and step sizes alpha."""
from regrad_jax.meta.objective import adapt, batched_adapt, init_alpha, inner_grad, task_loss
from regrad_jax.meta.state import load as load_state
from regrad_jax.meta.state import save as save_state
