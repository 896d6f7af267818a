"""The bi-level ReGrad objective (second order by default).

For a task with passages c_1..c_k, question q and answer a:

  inner:  g = sum_c grad_theta L_LM(c; theta)          (summed, not averaged)
          theta' = theta - alpha (.) g
  outer:  L_QA(theta') = CE on the answer tokens only (prompt masked)

and meta-learning minimises E_task[L_QA(theta')] over (theta, alpha). The outer
gradient flows *through* g: `jax.value_and_grad` of `task_loss`, which itself calls
`jax.grad` (learned_optimization style). With first_order=True the inner gradient
is treated as a constant (stop_gradient): cheaper, and NOT the reference method.

alpha is a pytree shaped after the LoRA tree, by mode:
  tie  : one scalar per LoRA tensor and layer, leaves (n, 1, 1), init alpha_init
  full : one per element, leaves shaped like the LoRA leaves
  same : one global scalar, a () array
  fix  : like tie but never updated (the trainer masks its update)
"""
import functools

import jax
import jax.numpy as jnp

from regrad_jax.model import losses

ALPHA_MODES = ("tie", "full", "same", "fix")


def init_alpha(lora: dict, mode: str, value: float):
  """Step sizes for a LoRA tree (see module docstring for the shapes)."""
  v = jnp.float32(value)
  if mode in ("tie", "fix"):
    return jax.tree.map(lambda x: jnp.full((x.shape[0], 1, 1), v), lora)
  if mode == "full":
    return jax.tree.map(lambda x: jnp.full(x.shape, v), lora)
  if mode == "same":
    return jnp.full((), v)
  raise ValueError(f"alpha mode must be one of {ALPHA_MODES}, got {mode!r}")


def scale(alpha, tree: dict) -> dict:
  """alpha (.) tree, broadcasting a scalar alpha or (n, 1, 1) leaves."""
  if isinstance(alpha, dict):
    return jax.tree.map(lambda a, g: a * g, alpha, tree)
  return jax.tree.map(lambda g: alpha * g, tree)


def adapt(theta: dict, alpha, grad_sum: dict, gamma=1.0) -> dict:
  """theta - gamma * alpha (.) grad_sum: the adapted LoRA for one query or task."""
  step = scale(alpha, grad_sum)
  return jax.tree.map(lambda t, s: t - jnp.asarray(gamma, t.dtype) * s, theta, step)


def batched_adapt(theta: dict, alpha, grad_sums: dict, gamma=1.0) -> dict:
  """Per-query adapted LoRA for a batch: grad_sums leaves (Q, n, ...) ->
  a batched LoRA tree with leaves (n, Q, ...), the layout the forward takes."""
  per_query = jax.vmap(lambda g: adapt(theta, alpha, g, gamma))(grad_sums)
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), per_query)


def inner_grad(params, theta, doc_tokens, doc_mask, *, config, lora_config,
               remat=False) -> dict:
  """sum_c grad_theta L_LM(c; theta) for one task's k passages, in one batched
  forward. doc_tokens/doc_mask: (k, Sd). Returns a tree shaped like theta."""
  def loss(theta):
    return jnp.sum(losses.lm_loss(params, theta, doc_tokens, doc_mask,
                                  config=config, lora_config=lora_config,
                                  remat=remat))
  return jax.grad(loss)(theta)


def task_loss(meta: dict, params, task: dict, *, config, lora_config,
              alpha_mode="tie", first_order=False, remat=False) -> jax.Array:
  """L_QA(theta - alpha (.) g(theta)) for one task (a dict of unbatched arrays).

  meta = {"theta": LoRA tree, "alpha": step sizes}. Base params are constant.
  """
  theta, alpha = meta["theta"], meta["alpha"]
  if alpha_mode == "fix":
    alpha = jax.lax.stop_gradient(alpha)
  g = inner_grad(params, theta, task["doc_tokens"], task["doc_mask"],
                 config=config, lora_config=lora_config, remat=remat)
  if first_order:
    g = jax.lax.stop_gradient(g)
  adapted = adapt(theta, alpha, g)
  return losses.answer_loss(
      params, adapted, task["qa_tokens"][None], task["qa_mask"][None],
      task["target_mask"][None], config=config, lora_config=lora_config,
      remat=remat)[0]


def batch_loss_and_grad(meta, params, batch, **kw):
  """Mean task loss and its (theta, alpha) gradient over a meta-batch.

  Tasks run one after another (`lax.map`-style scan with accumulated gradients):
  on CPU this is faster and 2-3x lighter than vmapping the second-order step.
  batch leaves: (T, ...). Returns (loss, grads) with grads shaped like meta.
  """
  grad_fn = jax.value_and_grad(functools.partial(task_loss, **kw))
  zero = jax.tree.map(jnp.zeros_like, meta)

  def one(carry, task):
    loss_sum, grad_sum = carry
    loss, grads = grad_fn(meta, params, task)
    return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

  (loss, grads), _ = jax.lax.scan(one, (jnp.float32(0), zero), batch)
  n = jnp.float32(jax.tree.leaves(batch)[0].shape[0])
  return loss / n, jax.tree.map(lambda g: g / n, grads)
