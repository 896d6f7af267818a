"""The Llama-family decoder as Flax linen modules, called in pure form.

`apply(params, tokens, ...) -> logits` is `Decoder(config).apply({"params": params},
tokens, ...)`: params are an explicit pytree (no hidden state), never modified. The
L decoder layers are stacked on a leading axis and run with `jax.lax.scan` (one scan
below the LoRA range, one from it to the top), so a 30-layer model compiles at most
two layer bodies. Weights use the x @ W layout, with these logical axis names
(parallel.LOGICAL_RULES maps them onto the mesh):

  embed (V, D)                 vocab, embed
  lm_head (D, V), unless tied  embed, vocab
  final_norm (D,)              embed
  layers/attn_norm, mlp_norm   (L, D)          layers, embed
  layers/q                     (L, D, H*hd)    layers, embed, heads
  layers/k, v                  (L, D, KV*hd)   layers, embed, kv
  layers/o                     (L, H*hd, D)    layers, heads, embed
  layers/gate, up              (L, D, F)       layers, embed, mlp
  layers/down                  (L, F, D)       layers, mlp, embed
  layers/q_bias, k_bias, v_bias (Qwen2 only)   (L, H*hd), (L, KV*hd)

Why linen, not NNX: the rest of the package (meta-gradients as jax.grad of a loss
that calls jax.grad, per-query batched LoRA, shard_map over tasks, TensorStore
checkpoints) passes weights as explicit trees; linen's `module.apply(variables,
...)` is a pure function of exactly such a tree, while NNX modules own mutable
state that would have to be split and merged around every transform. Linen also
keeps the param names chosen here, so the tree is the same nested dict the package
always used: released meta-states, bank manifests and their base-weight
fingerprints (regrad_jax/fingerprint.py hashes the tree) stay valid.

Why `jax.lax.scan` over `DecoderLayer.apply` rather than `nn.scan`: the two scans
split the one layer stack at the LoRA range's start, which the LoRA config picks at
call time, and a decode step reads its layer from the whole stack by index (see
`Decoder.__call__`); `nn.scan` would tie each scan to its own param stack. The
stack is one param, `layers`, initialised as L independent `DecoderLayer` inits.

An optional LoRA tree (see lora.py) adds low-rank updates; it is a separate tree,
not a Flax variable, and may be batched (each example its own adapter).

Attention positions come from the padding mask (cumsum), so left- and right-padded
batches give the same logits on their real tokens. With a KV cache, keys live in
slots [0, T); a query in slot i sees valid slots j <= i.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from regrad_jax.model import lora as lora_lib
from regrad_jax.model.config import ModelConfig

_NEG = np.float32(np.finfo(np.float32).min)
_NORMAL = nn.initializers.normal(0.02)  # Random init (tests, the tiny config).
# Logical axis names of each per-layer param (the stack adds "layers" in front).
_LAYER_AXES = {
    "q": ("embed", "heads"), "k": ("embed", "kv"), "v": ("embed", "kv"),
    "o": ("heads", "embed"), "gate": ("embed", "mlp"), "up": ("embed", "mlp"),
    "down": ("mlp", "embed"), "attn_norm": ("embed",), "mlp_norm": ("embed",),
    "q_bias": ("heads",), "k_bias": ("kv",), "v_bias": ("kv",)}


def logical_param(module: nn.Module, name: str, init, shape: tuple, axes: tuple):
  """A float32 param with logical axis names (nn.with_logical_partitioning)."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                      jnp.float32)


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


def _bf16_dot(x: jax.Array, w: jax.Array) -> jax.Array:
  """(..., d_in) x (d_in, d_out) -> float32, operands rounded to bfloat16."""
  return jax.lax.dot_general(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                             (((x.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


@jax.custom_vjp
def _bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  return _bf16_dot(x, w)


def _bf16_matmul_fwd(x, w):
  return _bf16_dot(x, w), (x, w)


def _bf16_matmul_bwd(res, g):
  # Both backward products are bf16 matmuls too (the autodiff rule would pair a
  # float32 cotangent with a bf16 operand: XLA's slow mixed path), and differentiable
  # again, through this rule, for the meta-gradient.
  x, w = res
  dx = _bf16_matmul(g, w.T)
  dw = _bf16_matmul(x.reshape(-1, x.shape[-1]).T, g.reshape(-1, g.shape[-1]))
  return dx.astype(x.dtype), dw.astype(w.dtype)


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def _matmul(x: jax.Array, w: jax.Array, matmul_dtype: str) -> jax.Array:
  """x @ w for the projections and the LM head. x: (..., d_in), w: (d_in, d_out).

  matmul_dtype "bfloat16" (ModelConfig.matmul_dtype): operands rounded to
  bfloat16, products summed in float32, result in x's dtype, in the forward and
  both backward products. On CPUs with AMX / AVX512-BF16 XLA runs these through
  oneDNN: this machine, (768 x 576) @ (576 x 1536): 1.7-2.0 ms vs 9.5 ms float32;
  a bf16-output dot gets no speed-up (8.7 ms), hence float32 accumulation.
  """
  if matmul_dtype == "float32":
    return x @ w
  return _bf16_matmul(x, w).astype(x.dtype)


def _dense(x: jax.Array, w: jax.Array, ab: dict | None, scale: float,
           matmul_dtype: str = "float32") -> jax.Array:
  """x @ w, plus the LoRA update. x: (B, S, d_in); A: (d_in, r) or (B, d_in, r).
  The low-rank LoRA products stay in x's dtype (cheap; theta* is what is learned)."""
  y = _matmul(x, w, matmul_dtype)
  if ab is None:
    return y
  a, b = ab["a"].astype(x.dtype), ab["b"].astype(x.dtype)
  if a.ndim == 2:
    return y + jnp.asarray(scale, x.dtype) * ((x @ a) @ b)
  h = jnp.einsum("bsd,bdr->bsr", x, a)
  return y + jnp.asarray(scale, x.dtype) * jnp.einsum("bsr,brf->bsf", h, b)


# What the adapted segment's backward pass saves (apply's `remat`):
#   "none": every residual (fastest; most memory);
#   "dots": matmul outputs without batch dimensions (the projections, LoRA
#     included); elementwise ops and attention scores/softmax are recomputed.
#     SmolLM2, second-order meta-step K=3 x 128 on 2 CPU cores: XLA temp
#     memory 1.74 -> 1.33 GB, peak RSS 2.84 -> 2.41 GB, step time unchanged
#     within the noise of a loaded machine (the recomputed ops are cheap);
#   "full": nothing (jax.checkpoint per layer, weights re-read by index): the
#     least memory (K=3 x 128: 0.79 GB temp) for ~1.4x the step time.
REMAT_MODES = ("none", "dots", "full")
_REMAT_POLICIES = {"dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                   "full": None}


def remat_mode(remat) -> str:
  """Normalises apply's `remat`: a REMAT_MODES name, or a bool (True = "full",
  the meaning it had before the modes; False/None = "none")."""
  if remat is None or remat is False:
    return "none"
  if remat is True:
    return "full"
  name = str(remat).lower()
  name = {"true": "full", "1": "full", "false": "none", "0": "none", "": "none"}.get(
      name, name)
  if name not in REMAT_MODES:
    raise ValueError(f"remat must be one of {REMAT_MODES} or a bool, got {remat!r}")
  return name


class DecoderLayer(nn.Module):
  """One pre-norm layer: RMSNorm, grouped-query attention with RoPE, RMSNorm, SwiGLU.

  Its params are one slice of the decoder's `layers` stack; `Decoder` runs it with
  `DecoderLayer(config).apply({"params": slice}, ...)` inside a `jax.lax.scan`.
  """
  config: ModelConfig

  def setup(self):
    c = self.config
    shapes = dict(lora_lib.projection_shapes(c), attn_norm=(c.d_model,),
                  mlp_norm=(c.d_model,))
    if c.qkv_bias:
      shapes.update({f"{n}_bias": (shapes[n][1],) for n in ("q", "k", "v")})
    init = lambda name: nn.initializers.ones if name.endswith("norm") else _NORMAL
    self.w = {name: logical_param(self, name, init(name), shape, _LAYER_AXES[name])
              for name, shape in shapes.items()}

  def weights(self) -> dict:
    """This layer's params (the `method` that `init` runs: no forward needed)."""
    return self.w

  def __call__(self, x, lora, cache_kv, index, *, scale, positions, mask, cache_index,
               inv_freq):
    """x: (B, S, D) -> (B, S, D), and the caches. mask: (B, S, T) bool over key slots.

    lora: None or this layer's {name: {"a", "b"}} (A (d_in, r) or batched
    (B, d_in, r)). cache_kv: None, or the whole (L, B, T, KV, hd) key and value
    caches: this layer (`index`) writes its S new slots into them in place and
    attends over its row.
    """
    config, layer = self.config, self.w
    B, S, _ = x.shape
    H, KV, hd = config.n_heads, config.n_kv_heads, config.head_dim
    ab = lambda name: None if lora is None else lora.get(name)
    dense = functools.partial(_dense, scale=scale, matmul_dtype=config.matmul_dtype)

    h = _rms_norm(x, layer["attn_norm"], config.norm_eps)
    q = dense(h, layer["q"], ab("q"))
    k = dense(h, layer["k"], ab("k"))
    v = dense(h, layer["v"], ab("v"))
    if config.qkv_bias:
      q, k, v = q + layer["q_bias"], k + layer["k_bias"], v + layer["v_bias"]
    q = _rope(q.reshape(B, S, H, hd), positions, inv_freq)
    k = _rope(k.reshape(B, S, KV, hd), positions, inv_freq)
    v = v.reshape(B, S, KV, hd)
    if cache_kv is not None:
      # Updating the full caches (a loop carry) in place, rather than stacking
      # per-layer outputs, keeps each decode step from copying the whole cache
      # (SmolLM2 at B=16 on 2 CPU cores: 145 -> 101 ms a step).
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
    x = x + dense(attn, layer["o"], ab("o"))

    h = _rms_norm(x, layer["mlp_norm"], config.norm_eps)
    g = dense(h, layer["gate"], ab("gate"))
    u = dense(h, layer["up"], ab("up"))
    x = x + dense(jax.nn.silu(g) * u, layer["down"], ab("down"))
    return x, cache_kv


def stack_init(key: jax.Array, layer: nn.Module, n: int, method) -> dict:
  """n independent inits of `layer` (its params, via `method`) stacked on a leading
  axis named "layers": the params a `jax.lax.scan` over `layer.apply` reads."""
  one = lambda k: layer.init(k, method=method)["params"]
  stack = jax.vmap(one)(jax.random.split(key, n))
  return jax.tree.map(lambda box: box.add_axis(0, {nn.PARTITION_NAME: "layers"}),
                      stack, is_leaf=lambda x: isinstance(x, nn.Partitioned))


class Decoder(nn.Module):
  """Token embedding, the stacked DecoderLayers, final RMSNorm, LM head."""
  config: ModelConfig

  def setup(self):
    c = self.config
    V, D = c.vocab_size, c.d_model
    self.embed = logical_param(self, "embed", _NORMAL, (V, D), ("vocab", "embed"))
    self.layers = self.param("layers", stack_init, DecoderLayer(c, parent=None),
                             c.n_layers, DecoderLayer.weights)
    self.final_norm = logical_param(self, "final_norm", nn.initializers.ones, (D,),
                                    ("embed",))
    if not c.tie_embeddings:
      self.lm_head = logical_param(self, "lm_head", _NORMAL, (D, V), ("embed", "vocab"))

  def weights(self) -> dict:
    """All params (the `method` that `init` runs: no forward needed)."""
    out = {"embed": self.embed, "layers": self.layers, "final_norm": self.final_norm}
    if not self.config.tie_embeddings:
      out["lm_head"] = self.lm_head
    return out

  def __call__(self, tokens, *, lora=None, lora_config=None, mask=None, positions=None,
               cache=None, cache_index=0, remat=False, return_hidden=False,
               last_only=False):
    """See `apply` (the same arguments, params aside)."""
    config = self.config
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

    x = self.embed[tokens].astype(dtype)
    stack, layer = self.layers, DecoderLayer(config, parent=None)
    body = functools.partial(
        layer.apply, scale=scale, positions=positions, mask=attn_mask,
        cache_index=cache_index, inv_freq=rope_inv_freq(config))

    def step(carry, xs):
      x, kv = carry
      weights, layer_lora, index = xs
      if weights is None:  # Read (and cast) this layer from the whole stack.
        weights = jax.tree.map(
            lambda w: jax.lax.dynamic_index_in_dim(w, index, keepdims=False).astype(dtype),
            stack)
      return body({"params": weights}, x, layer_lora, kv, index), None

    remat = remat_mode(remat)
    kv = None if cache is None else (cache["k"], cache["v"])
    # Layers below the adapted range run without LoRA in their own scan: their
    # output is constant w.r.t. LoRA, so gradients stop there (about 1.4x faster
    # per-document and meta gradients for the upper-half layout). That scan, and
    # every decode step (a loop, no gradients), reads its layer from the whole
    # stack by index: a segment slice would be a copy of those weights (SmolLM2:
    # 212 MB for the lower half, alive in the meta-step; at every decode step ~2x
    # the cost of a B=1 step with the upper-half layout). The adapted segment of
    # a differentiated forward (no cache) takes its cast layers as xs instead: a
    # backward pass then saves no per-layer weight copies as residuals (read by
    # index, each layer's weights would be stacked as residuals of the backward,
    # twice the memory of the slice), except under remat ("dots" or "full"): a
    # checkpointed step saves no weights, so they are read again by index (the
    # bank's step, 8 x 128 tokens in pieces of 4, "dots": XLA temp 0.63 -> 0.43
    # GB). Only that segment has a backward pass, so only it is rematerialised.
    for lo, hi, seg_lora in ((0, start, None), (start, config.n_layers, upper)):
      if hi <= lo:
        continue
      # The segment a backward pass may go through: the adapted one, or the whole
      # stack without LoRA (gradients w.r.t. the base params, e.g. full CPT).
      differentiated = seg_lora is not None or lora is None
      seg, seg_step = None, step
      if cache is None and differentiated and (remat == "none" or seg_lora is None):
        seg = jax.tree.map(lambda a: a[lo:hi].astype(dtype), stack)
      if differentiated and remat in _REMAT_POLICIES:
        # Checkpointed twice: a gradient's partial evaluation uses up one
        # checkpoint (its forward becomes a plain scan), so the meta-gradient,
        # which differentiates that forward again, saw none and stacked every
        # activation and layer weight as residuals (SmolLM2 meta-step, 2 tasks
        # K=1 x 64, "dots": XLA temp 0.42 -> 0.20 GB; K=3 x 128 1.23 -> 0.90 GB).
        policy = _REMAT_POLICIES[remat]
        seg_step = jax.checkpoint(jax.checkpoint(step, policy=policy), policy=policy)
      (x, kv), _ = jax.lax.scan(seg_step, (x, kv), (seg, seg_lora,
                                                    jnp.arange(lo, hi, dtype=jnp.int32)))
    if last_only:  # Prefill: only the last position's logits are needed.
      x = x[:, -1:]
    x = _rms_norm(x, self.final_norm, config.norm_eps)
    head = self.embed.T if config.tie_embeddings else self.lm_head
    logits = _matmul(x, head.astype(dtype), config.matmul_dtype).astype(jnp.float32)
    out = (logits,)
    if cache is not None:
      out += ({"k": kv[0], "v": kv[1]},)
    if return_hidden:
      out += (x,)
    return out[0] if len(out) == 1 else out


def init_params(key: jax.Array, config: ModelConfig) -> dict:
  """Random params (normal, std 0.02; norms at 1): for tests and the tiny config."""
  variables = Decoder(config).init(key, method=Decoder.weights)
  return nn.unbox(variables["params"])


def param_shapes(config: ModelConfig) -> dict:
  """ShapeDtypeStructs of the params, without allocating them."""
  return jax.eval_shape(functools.partial(init_params, config=config),
                        jax.random.key(0))


def logical_axes(config: ModelConfig) -> dict:
  """The params' logical axis names: a PartitionSpec of names per leaf (for
  parallel.param_shardings); computed with jax.eval_shape, nothing allocated."""
  boxed = jax.eval_shape(lambda: Decoder(config).init(jax.random.key(0),
                                                      method=Decoder.weights))
  return nn.get_partition_spec(boxed["params"])


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """(B, S) bool -> (B, S) int32 positions counting only real tokens."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def apply(params: dict, tokens: jax.Array, *, config: ModelConfig,
          lora: dict | None = None, lora_config: lora_lib.LoraConfig | None = None,
          mask: jax.Array | None = None, positions: jax.Array | None = None,
          cache: dict | None = None, cache_index: jax.Array | int = 0,
          remat: bool = False, return_hidden: bool = False, last_only: bool = False):
  """Runs the decoder: `Decoder(config).apply({"params": params}, tokens, ...)`.

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
    remat: what the backward pass of the adapted (LoRA) layers saves: "none",
      "dots" or "full" (see REMAT_MODES above), or a bool (True = "full").
    return_hidden: also return the final hidden states (B, S, D).
    last_only: logits (and hidden states) of the last position only, (B, 1, ...):
      a prefill needs no more, and the (S, V) head is a fifth of its compute.

  Returns:
    logits (B, S, V) float32, and the updated cache when `cache` is given
    (and hidden states when asked).
  """
  return Decoder(config).apply(
      {"params": params}, tokens, lora=lora, lora_config=lora_config, mask=mask,
      positions=positions, cache=cache, cache_index=cache_index, remat=remat,
      return_hidden=return_hidden, last_only=last_only)


def init_cache(config: ModelConfig, batch: int, length: int) -> dict:
  """Zeroed key/value slots: {"k", "v"} each (L, B, T, KV, hd) in compute dtype."""
  shape = (config.n_layers, batch, length, config.n_kv_heads, config.head_dim)
  z = jnp.zeros(shape, jnp.dtype(config.dtype))
  return {"k": z, "v": z}
