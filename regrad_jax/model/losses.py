"""Token-level losses shared by meta-learning, the bank, baselines and evaluation."""
import jax
import jax.numpy as jnp

from regrad_jax.model import transformer


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """(B, S, V) float32 logits, (B, S) int32 targets -> (B, S) negative log-likelihood."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return logz - picked


def _mean_next_token_nll(logits, tokens, weight) -> jax.Array:
  """(B,) mean NLL of tokens[:, t+1] under logits[:, t], weighted by (B, S-1) `weight`.

  Scores all S positions against the targets shifted left by one (the last
  position's target is a dummy with weight 0) instead of slicing logits[:, :-1]:
  the slice would be a copy of the (B, S, V) logits, alive with its gradient
  through the backward (SmolLM2, K=3 x 128: 72 MB per copy).
  """
  targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
  w = jnp.concatenate([weight, jnp.zeros_like(weight[:, :1])], axis=1)
  w = w.astype(jnp.float32)
  nll = token_nll(logits, targets)
  return jnp.sum(nll * w, -1) / jnp.maximum(jnp.sum(w, -1), jnp.float32(1))


def lm_loss(params, lora, tokens, mask, *, config, lora_config=None,
            remat=False) -> jax.Array:
  """Mean next-token loss over real tokens, per example.

  This is L_LM(d; theta) of the method: the loss whose gradient w.r.t. the LoRA tree
  is a document's gradient. Token t predicts t+1 where both are real tokens.

  Args:
    tokens: (B, S) int32, mask: (B, S) bool (True on real tokens).
  Returns:
    (B,) float32 mean loss per example (0 for an example with < 2 tokens).
  """
  logits = transformer.apply(params, tokens, config=config, lora=lora,
                             lora_config=lora_config, mask=mask, remat=remat)
  return _mean_next_token_nll(logits, tokens, mask[:, :-1] & mask[:, 1:])


def answer_loss(params, lora, tokens, mask, target_mask, *, config,
                lora_config=None, remat=False) -> jax.Array:
  """Cross-entropy on answer tokens only (prompt masked): L_QA of the method.

  Args:
    tokens: (B, S) int32 prompt + answer; mask: (B, S) real tokens;
    target_mask: (B, S) bool, True on the answer tokens to be predicted.
  Returns:
    (B,) mean loss over each example's answer tokens.
  """
  logits = transformer.apply(params, tokens, config=config, lora=lora,
                             lora_config=lora_config, mask=mask, remat=remat)
  return _mean_next_token_nll(logits, tokens, target_mask[:, 1:])
