"""Batched greedy / temperature decoding with a KV cache, jitted with static shapes.

Prompts may be left- or right-padded: each row is first left-aligned (real tokens
end at column P-1), so all rows write the same cache slot at every step. Decoding
stops early once every row has produced EOS (a `while_loop`); the output is always
(B, max_new_tokens), padded with `pad_id` after EOS.
"""
import functools

import jax
import jax.numpy as jnp

from regrad_jax.model import lora as lora_lib
from regrad_jax.model import transformer
from regrad_jax.model.config import ModelConfig


def left_align(tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Moves each row's real tokens to the right end. (B, P) -> (B, P), (B, P)."""
  P = tokens.shape[1]
  n = jnp.sum(mask, axis=1, dtype=jnp.int32)
  # Row r's real tokens, wherever they are, keep their order: sort by (mask, col).
  order = jnp.argsort(mask.astype(jnp.int32) * P + jnp.arange(P)[None], axis=1)
  aligned = jnp.take_along_axis(tokens, order, axis=1)
  new_mask = jnp.arange(P)[None] >= (P - n)[:, None]
  return jnp.where(new_mask, aligned, 0), new_mask


@functools.partial(jax.jit, static_argnames=(
    "config", "lora_config", "max_new_tokens"))
def generate(params: dict, tokens: jax.Array, mask: jax.Array, *,
             config: ModelConfig, lora: dict | None = None,
             lora_config: lora_lib.LoraConfig | None = None,
             max_new_tokens: int = 20, temperature: jax.Array | float = 0.0,
             rng: jax.Array | None = None) -> jax.Array:
  """Decodes up to max_new_tokens after each prompt.

  Args:
    params: base params; lora: optional LoRA tree, shared or batched per row.
    tokens: (B, P) int32 prompts; mask: (B, P) bool, True on real tokens.
    temperature: 0 for greedy; > 0 samples from softmax(logits / temperature).
    rng: PRNG key, needed when temperature > 0.
  Returns:
    (B, max_new_tokens) int32 new tokens; pad_id after EOS.
  """
  B, P = tokens.shape
  T = P + max_new_tokens
  tokens, mask = left_align(tokens, mask)
  n_real = jnp.sum(mask, axis=1, dtype=jnp.int32)
  key_mask = jnp.concatenate([mask, jnp.ones((B, max_new_tokens), bool)], axis=1)
  if lora is not None:  # Pad once here, not at every decode step.
    lora, lora_config = lora_lib.pad_to_top(lora, lora_config, config.n_layers)
  fwd = functools.partial(transformer.apply, params, config=config,
                          lora=lora, lora_config=lora_config, mask=key_mask)
  logits, cache = fwd(tokens, positions=transformer.positions_from_mask(mask),
                      cache=transformer.init_cache(config, B, T),
                      cache_index=jnp.int32(0), last_only=True)
  rng = jax.random.key(0) if rng is None else rng
  temperature = jnp.asarray(temperature, jnp.float32)

  def pick(logits, key):
    greedy = jnp.argmax(logits, -1).astype(jnp.int32)
    sampled = jax.random.categorical(
        key, logits / jnp.maximum(temperature, jnp.float32(1e-6))).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)

  def cond(state):
    t, _, _, _, done, _ = state
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(state):
    t, out, cache, last, done, rng = state
    rng, key = jax.random.split(rng)
    tok = jnp.where(done, jnp.int32(config.pad_id), pick(last, key))
    out = out.at[:, t].set(tok)
    done = done | (tok == config.eos_id)
    logits, cache = fwd(tok[:, None], positions=(n_real + t)[:, None],
                        cache=cache, cache_index=P + t)
    return t + 1, out, cache, logits[:, -1], done, rng

  out = jnp.full((B, max_new_tokens), config.pad_id, jnp.int32)
  state = (jnp.int32(0), out, cache, logits[:, -1], jnp.zeros((B,), bool), rng)
  return jax.lax.while_loop(cond, body, state)[1]
