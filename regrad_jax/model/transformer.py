"""A pure-function Llama-family decoder: `apply(params, tokens, ...) -> logits`.

Params are an explicit pytree (no hidden state); the L decoder layers are stacked on
a leading axis and run with `jax.lax.scan` (one scan below the LoRA range, one from
it to the top), so a 30-layer model compiles at most two layer bodies. Weights use the x @ W layout:

  embed (V, D)            final_norm (D,)          lm_head (D, V) unless tied
  layers/attn_norm (L, D) layers/q (L, D, H*hd)    layers/k, v (L, D, KV*hd)
  layers/o (L, H*hd, D)   layers/mlp_norm (L, D)   layers/gate, up (L, D, F)
  layers/down (L, F, D)   layers/q_bias (L, H*hd), k_bias, v_bias (Qwen2 only)

An optional LoRA tree (see lora.py) adds low-rank updates; it may be batched (each
example its own adapter). Neither params nor LoRA are ever modified.

Attention positions come from the padding mask (cumsum), so left- and right-padded
batches give the same logits on their real tokens. With a KV cache, keys live in
slots [0, T); a query in slot i sees valid slots j <= i.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from regrad_jax.model import lora as lora_lib
from regrad_jax.model.config import ModelConfig

_NEG = np.float32(np.finfo(np.float32).min)


def init_params(key: jax.Array, config: ModelConfig) -> dict:
  """Random params (normal, std 0.02; norms at 1): for tests and the tiny config."""
  L, D, F = config.n_layers, config.d_model, config.d_ff
  shapes = lora_lib.projection_shapes(config)
  keys = iter(jax.random.split(key, 16))
  normal = lambda shape: 0.02 * jax.random.normal(next(keys), shape, jnp.float32)
  layers = {name: normal((L,) + shapes[name]) for name in lora_lib.TARGETS}
  layers["attn_norm"] = jnp.ones((L, D), jnp.float32)
  layers["mlp_norm"] = jnp.ones((L, D), jnp.float32)
  if config.qkv_bias:
    for name in ("q", "k", "v"):
      layers[f"{name}_bias"] = normal((L, shapes[name][1]))
  params = {"embed": normal((config.vocab_size, D)), "layers": layers,
            "final_norm": jnp.ones((D,), jnp.float32)}
  if not config.tie_embeddings:
    params["lm_head"] = normal((D, config.vocab_size))
  return params


def param_shapes(config: ModelConfig) -> dict:
  """ShapeDtypeStructs of the params, without allocating them."""
  return jax.eval_shape(functools.partial(init_params, config=config),
                        jax.random.key(0))


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """(head_dim // 2,) inverse frequencies, with Llama-3 scaling when configured."""
  hd = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
  if config.rope_scaling:
    kind, factor, low, high, orig = config.rope_scaling
    if kind != "llama3":
      raise ValueError(f"unsupported rope_scaling {kind!r}")
    low_wl, high_wl = orig / low, orig / high
    wavelen = 2 * math.pi / inv
    smooth = (orig / wavelen - low) / (high - low)
    scaled = np.where(wavelen > low_wl, inv / factor, inv)
    mid = (wavelen <= low_wl) & (wavelen >= high_wl)
    inv = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
  return inv.astype(np.float32)


def _rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotate-half RoPE. x: (B, S, heads, hd); positions: (B, S) int32."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, S, hd/2)
  cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


def _rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)
  return (y * w.astype(jnp.float32)).astype(x.dtype)


def _dense(x: jax.Array, w: jax.Array, ab: dict | None, scale: float) -> jax.Array:
  """x @ w, plus the LoRA update. x: (B, S, d_in); A: (d_in, r) or (B, d_in, r)."""
  y = x @ w
  if ab is None:
    return y
  a, b = ab["a"].astype(x.dtype), ab["b"].astype(x.dtype)
  if a.ndim == 2:
    return y + jnp.asarray(scale, x.dtype) * ((x @ a) @ b)
  h = jnp.einsum("bsd,bdr->bsr", x, a)
  return y + jnp.asarray(scale, x.dtype) * jnp.einsum("bsr,brf->bsf", h, b)


def _layer(x, layer, lora, cache_kv, index, *, config, scale, positions, mask,
           cache_index, inv_freq):
  """One decoder layer. x: (B, S, D); mask: (B, S, T) bool over key slots.

  cache_kv: None, or the whole (L, B, T, KV, hd) key and value caches: this layer
  (`index`) writes its S new slots into them in place and attends over its row.
  """
  B, S, _ = x.shape
  H, KV, hd = config.n_heads, config.n_kv_heads, config.head_dim
  ab = lambda name: None if lora is None else lora.get(name)

  h = _rms_norm(x, layer["attn_norm"], config.norm_eps)
  q = _dense(h, layer["q"], ab("q"), scale)
  k = _dense(h, layer["k"], ab("k"), scale)
  v = _dense(h, layer["v"], ab("v"), scale)
  if config.qkv_bias:
    q, k, v = q + layer["q_bias"], k + layer["k_bias"], v + layer["v_bias"]
  q = _rope(q.reshape(B, S, H, hd), positions, inv_freq)
  k = _rope(k.reshape(B, S, KV, hd), positions, inv_freq)
  v = v.reshape(B, S, KV, hd)
  if cache_kv is not None:
    # Updating the full caches (a loop carry) in place, rather than stacking per-layer
    # outputs, keeps each decode step from copying the whole cache (SmolLM2 at B=16 on
    # 2 CPU cores: 145 -> 101 ms a step).
    start = (index, jnp.int32(0), jnp.asarray(cache_index, jnp.int32), jnp.int32(0),
             jnp.int32(0))
    cache_kv = tuple(jax.lax.dynamic_update_slice(c, new[None].astype(c.dtype), start)
                     for c, new in zip(cache_kv, (k, v)))
    k, v = (jax.lax.dynamic_index_in_dim(c, index, keepdims=False) for c in cache_kv)
  # Grouped-query attention: G = H / KV query heads share each key/value head.
  qg = q.reshape(B, S, KV, H // KV, hd)
  scores = jnp.einsum("bskgd,btkd->bkgst", qg, k.astype(q.dtype)).astype(jnp.float32)
  scores = scores / np.float32(math.sqrt(hd))
  scores = jnp.where(mask[:, None, None], scores, _NEG)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  attn = jnp.einsum("bkgst,btkd->bskgd", probs, v.astype(q.dtype)).reshape(B, S, H * hd)
  x = x + _dense(attn, layer["o"], ab("o"), scale)

  h = _rms_norm(x, layer["mlp_norm"], config.norm_eps)
  g = _dense(h, layer["gate"], ab("gate"), scale)
  u = _dense(h, layer["up"], ab("up"), scale)
  x = x + _dense(jax.nn.silu(g) * u, layer["down"], ab("down"), scale)
  return x, cache_kv


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """(B, S) bool -> (B, S) int32 positions counting only real tokens."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def apply(params: dict, tokens: jax.Array, *, config: ModelConfig,
          lora: dict | None = None, lora_config: lora_lib.LoraConfig | None = None,
          mask: jax.Array | None = None, positions: jax.Array | None = None,
          cache: dict | None = None, cache_index: jax.Array | int = 0,
          remat: bool = False, return_hidden: bool = False, last_only: bool = False):
  """Runs the decoder.

  Args:
    params: base params (see module docstring). Never modified.
    tokens: (B, S) int32.
    config: the architecture.
    lora: optional LoRA tree, (n, ...) leaves or batched (n, B, ...) leaves.
    lora_config: required with `lora`.
    mask: (B, S) bool, True on real tokens (default: all real). Without a cache,
      attention is causal over real tokens; with a cache, `mask` is over the
      cache's T key slots, (B, T).
    positions: (B, S) int32 RoPE positions (default: from `mask`).
    cache: optional {"k", "v"}: (L, B, T, KV, hd) key/value slots; the S new
      tokens are written at slots [cache_index, cache_index + S).
    cache_index: int32 scalar slot of tokens[:, 0].
    remat: rematerialise each layer in the backward pass (less memory).
    return_hidden: also return the final hidden states (B, S, D).
    last_only: logits (and hidden states) of the last position only, (B, 1, ...):
      a prefill needs no more, and the (S, V) head is a fifth of its compute.

  Returns:
    logits (B, S, V) float32, and the updated cache when `cache` is given
    (and hidden states when asked).
  """
  dtype = jnp.dtype(config.dtype)
  B, S = tokens.shape
  if mask is None:
    mask = jnp.ones((B, S) if cache is None else cache["k"].shape[1:3], bool)
  if cache is None:
    if positions is None:
      positions = positions_from_mask(mask)
    causal = jnp.tril(jnp.ones((S, S), bool))
    attn_mask = causal[None] & mask[:, None, :]
  else:
    if positions is None:
      raise ValueError("apply with a cache needs explicit positions")
    T = cache["k"].shape[2]
    slots = jnp.arange(T)[None, :] <= (cache_index + jnp.arange(S))[:, None]
    attn_mask = slots[None] & mask[:, None, :]

  scale, start, upper = 1.0, 0, None
  if lora is not None:
    if lora_config is None:
      raise ValueError("apply(lora=...) needs lora_config")
    upper, lora_config = lora_lib.pad_to_top(lora, lora_config, config.n_layers)
    scale, start = lora_config.scale, lora_config.start

  x = params["embed"][tokens].astype(dtype)
  body = functools.partial(
      _layer, config=config, scale=scale, positions=positions, mask=attn_mask,
      cache_index=cache_index, inv_freq=rope_inv_freq(config))

  def step(carry, xs):
    x, kv = carry
    layer, layer_lora, index = xs
    if layer is None:  # Decoding: read (and cast) this layer from the whole stack.
      layer = jax.tree.map(
          lambda w: jax.lax.dynamic_index_in_dim(w, index, keepdims=False).astype(dtype),
          params["layers"])
    return body(x, layer, layer_lora, kv, index), None

  if remat:
    step = jax.checkpoint(step)
  kv = None if cache is None else (cache["k"], cache["v"])
  # Layers below the adapted range run without LoRA in their own scan: their
  # output is constant w.r.t. LoRA, so gradients stop there (about 1.4x faster
  # per-document and meta gradients for the upper-half layout). Without a cache
  # (training, scoring) each scan takes its segment's cast layers as xs, so a
  # backward pass saves no weight copies as residuals. With a cache (decoding: a
  # loop, no gradients) each step reads its layer from the whole stack instead: a
  # segment slice would copy those weights at every decode step (~2x the cost of a
  # B=1 step with the upper-half LoRA layout).
  layers = None
  if cache is None:
    layers = jax.tree.map(lambda w: w.astype(dtype), params["layers"])
  for lo, hi, seg_lora in ((0, start, None), (start, config.n_layers, upper)):
    if hi > lo:
      seg_layers = None if layers is None else jax.tree.map(lambda a: a[lo:hi], layers)
      (x, kv), _ = jax.lax.scan(step, (x, kv), (seg_layers, seg_lora,
                                                 jnp.arange(lo, hi, dtype=jnp.int32)))
  if last_only:  # Prefill: only the last position's logits are needed.
    x = x[:, -1:]
  x = _rms_norm(x, params["final_norm"], config.norm_eps)
  head = params["embed"].T if config.tie_embeddings else params["lm_head"]
  logits = (x @ head.astype(dtype)).astype(jnp.float32)
  out = (logits,)
  if cache is not None:
    out += ({"k": kv[0], "v": kv[1]},)
  if return_hidden:
    out += (x,)
  return out[0] if len(out) == 1 else out


def init_cache(config: ModelConfig, batch: int, length: int) -> dict:
  """Zeroed key/value slots: {"k", "v"} each (L, B, T, KV, hd) in compute dtype."""
  shape = (config.n_layers, batch, length, config.n_kv_heads, config.head_dim)
  z = jnp.zeros(shape, jnp.dtype(config.dtype))
  return {"k": z, "v": z}
