"""regrad_jax: Retrievable Gradients (ReGrad) in JAX/Flax."""
