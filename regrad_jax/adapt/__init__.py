"""Stage 3 of ReGrad: retrieve, gather gradients, adapt per query, answer."""
from regrad_jax.adapt.engine import ReGrad, Result
from regrad_jax.adapt.online import generate_adapted
