"""Stage 3 of ReGrad: answer with theta_q = theta* - gamma * alpha (.) sum_k g_k.

`generate_adapted` is the one jitted call per batch of queries: it forms every
query's adapted LoRA from its own gathered gradient sum and decodes all queries
together, each through its own adapter (a batched LoRA tree: leaves (n, Q, ...)).
No weight copy is made per query; theta_q exists only inside the call and is
discarded with it. Base params and theta* are inputs and are never written (no
buffer donation), so they stay bitwise identical across any number of queries.
"""
import functools

import jax

from regrad_jax.meta import objective
from regrad_jax.model import decode


@functools.partial(jax.jit, static_argnames=("config", "lora_config",
                                             "max_new_tokens"))
def generate_adapted(params, theta, alpha, grad_sums, prompt_tokens, prompt_mask,
                     gamma, *, config, lora_config, max_new_tokens=20):
  """Greedy answers of Q queries, each with its own adapted LoRA.

  Args:
    params: base params. theta, alpha: the meta-learned state.
    grad_sums: LoRA-shaped tree with leaves (Q, n, ...): sum_k g_k per query.
    prompt_tokens, prompt_mask: (Q, P) int32 / bool (left or right padded).
    gamma: float32 scalar test-time step scale.
  Returns:
    (Q, max_new_tokens) int32 answer tokens (pad after EOS).
  """
  lora = objective.batched_adapt(theta, alpha, grad_sums, gamma)
  return decode.generate(params, prompt_tokens, prompt_mask, config=config,
                               lora=lora, lora_config=lora_config,
                               max_new_tokens=max_new_tokens)
