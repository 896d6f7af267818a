"""Gradient codecs: how one document's LoRA gradient is stored in the bank.

A codec maps one gradient leaf, batched over documents, x: (B, *shape) float32 with
shape = (n, m1, m2), to named parts (arrays that share the leading B) and back:

  codec.parts(shape) -> {part: Part(per-row shape, dtype, zstd level)}
                                           what the bank stores, one array each
  codec.encode(x) -> {part: (B, ...)}      jnp, runs inside the jitted gradient
                                           step, on device, sharded like the docs
  codec.decode(parts, shape) -> (R, *shape) float32   jnp, runs on read inside
                                           the bank's jitted decode (and sum)

The "vector" of a leaf is a line along the longer of its last two axes, so there is
one vector per rank component and layer: for LoRA A (n, d_in, r) a column A[l, :, j]
(length d_in), for B (n, r, d_out) a row B[l, j, :] (length d_out). A vector holds
the gradient of one rank component; magnitudes differ much more between components
than within one, so that is where a scale pays.

Codecs and their guaranteed errors (x an element, x' its decoded value, v its
vector of length m_v, M one layer's (m, r) matrix with m the long side; the bounds
hold up to float32 rounding of x / step, ~1e-5 relative):

  fp32     exact.                                    4 bytes/value
  bf16     |x' - x| <= 2^-8 |x|  (8 significant bits, round to nearest).
                                                     2 bytes/value
  int8     |x' - x| <= max|v| / 254  (symmetric, step = max|v| / 127, one float32
           step per vector).                         ~1 byte/value
  qzstd    |x' - x| <= D_v / 2 with the step D_v = max(step * rms(v), max|v| / 127)
           (rms(v) = sqrt(mean(v^2))). The first term rules whenever
           m_v <= (127 step)^2 (max|v| <= sqrt(m_v) rms(v)), so the error is
           ~step / sqrt(12) of the vector's rms (about 12% at step 0.4) however
           heavy its tails, where int4's max-scaled step loses most small values.
           Stored as int8 and entropy-coded with zstd on disk (TensorStore decodes
           on read): gradient values are concentrated, so a step of 0.4 rms costs
           about 3.5 bits/value: ~9x smaller than fp32 (measured per bank: the
           size depends on the data).
  lowrank  rank-k truncated SVD per layer matrix, M ~ P Q^T with P = U_k S_k (m, k)
           and Q = V_k (r, k), both stored int8 with one step per column:
             ||M' - M||_F <= ||M - M_k||_F + e_P + s_1 e_Q + e_P e_Q,
           where M_k is the best rank-k approximation, s_1 the largest singular
           value, e_P = ||P' - P||_F <= sqrt(m sum_j (max|P_j| / 254)^2) and
           e_Q <= sqrt(r sum_j (max|Q_j| / 254)^2) <= sqrt(r k) / 254 (|Q| <= 1).
           ~(m + r) k / (m r) bytes/value: 15.6x smaller than fp32 for SmolLM2
           (m = 576 or 1536, r = 16) at k = 4, but the truncation term depends on
           the gradient's spectrum, which is flat for LoRA B gradients
           (benchmarks/bank_build.py measures it).
"""
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

NAMES = ("fp32", "bf16", "int8", "qzstd", "lowrank")


class Part(NamedTuple):
  """One stored array of a leaf: per-row shape, zarr3 dtype name, zstd level (0: raw)."""
  shape: tuple
  dtype: str
  zstd: int = 0


def _long_axis(shape) -> int:
  """The axis (-2 or -1) that vectors run along: the longer of the last two."""
  if len(shape) < 2:
    raise ValueError(f"codecs need leaves with >= 2 dims, got shape {tuple(shape)}")
  return -2 if shape[-2] >= shape[-1] else -1


def _quantize(x, axis: int, rms_step: float | None = None):
  """Symmetric int8 with one step per line along `axis` (jnp) -> (q, step).

  The step is max|v| / 127 (no clipping), or at least rms_step * rms(v) when given.
  """
  step = jnp.max(jnp.abs(x), axis=axis, keepdims=True) / jnp.float32(127)
  if rms_step is not None:
    rms = jnp.sqrt(jnp.mean(jnp.square(x), axis=axis, keepdims=True))
    step = jnp.maximum(step, jnp.float32(rms_step) * rms)
  safe = jnp.where(step > 0, step, jnp.float32(1))
  q = jnp.clip(jnp.round(x / safe), -127, 127).astype(jnp.int8)
  return q, step.astype(jnp.float32)


def _dequantize(q, step) -> jax.Array:
  return q.astype(jnp.float32) * step.astype(jnp.float32)


def _step_shape(shape, axis: int) -> tuple[int, ...]:
  out = list(shape)
  out[axis] = 1
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Fp32:
  """Exact float32 storage."""
  name = "fp32"

  def to_dict(self) -> dict:
    return {"name": self.name}

  def parts(self, shape) -> dict:
    return {"x": Part(tuple(shape), "float32")}

  def encode(self, x) -> dict:
    return {"x": x.astype(jnp.float32)}

  def decode(self, parts: dict, shape) -> jax.Array:
    return jnp.asarray(parts["x"], jnp.float32)


@dataclasses.dataclass(frozen=True)
class Bf16:
  """bfloat16 storage: float32's range, 8 significant bits."""
  name = "bf16"

  def to_dict(self) -> dict:
    return {"name": self.name}

  def parts(self, shape) -> dict:
    return {"x": Part(tuple(shape), "bfloat16")}

  def encode(self, x) -> dict:
    return {"x": x.astype(jnp.bfloat16)}

  def decode(self, parts: dict, shape) -> jax.Array:
    return jnp.asarray(parts["x"], jnp.bfloat16).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Int8:
  """int8 with one float32 step (max|v| / 127) per vector."""
  name = "int8"

  def to_dict(self) -> dict:
    return {"name": self.name}

  def parts(self, shape) -> dict:
    axis = _long_axis(shape)
    return {"q": Part(tuple(shape), "int8"),
            "scale": Part(_step_shape(shape, axis), "float32")}

  def encode(self, x) -> dict:
    q, step = _quantize(x.astype(jnp.float32), _long_axis(x.shape))
    return {"q": q, "scale": step}

  def decode(self, parts: dict, shape) -> jax.Array:
    return _dequantize(parts["q"], parts["scale"])


@dataclasses.dataclass(frozen=True)
class QZstd:
  """int8 at a step of `step` x the vector's rms, zstd-coded on disk.

  Attributes:
    step: quantisation step as a fraction of each vector's rms (error ~ step /
      sqrt(12) of the rms; larger is smaller on disk).
    level: zstd level (3: ~30 ms per SmolLM2 document on one core, within
      0.3 bits/value of level 19, which costs 60x the time).
  """
  step: float = 0.4
  level: int = 3
  name = "qzstd"

  def __post_init__(self):
    if not 0 < float(self.step) <= 8:
      raise ValueError(f"qzstd step must be in (0, 8] (x rms), got {self.step}")
    if not 1 <= int(self.level) <= 22:
      raise ValueError(f"qzstd zstd level must be in [1, 22], got {self.level}")

  def to_dict(self) -> dict:
    return {"name": self.name, "step": float(self.step), "level": int(self.level)}

  def parts(self, shape) -> dict:
    axis = _long_axis(shape)
    return {"q": Part(tuple(shape), "int8", int(self.level)),
            "scale": Part(_step_shape(shape, axis), "float32")}

  def encode(self, x) -> dict:
    q, step = _quantize(x.astype(jnp.float32), _long_axis(x.shape), float(self.step))
    return {"q": q, "scale": step}

  def decode(self, parts: dict, shape) -> jax.Array:
    return _dequantize(parts["q"], parts["scale"])


@dataclasses.dataclass(frozen=True)
class LowRank:
  """Rank-k truncated SVD of each layer matrix, factors stored as int8.

  A matrix is taken with its long side first, M: (m, r) (LoRA B leaves are
  transposed), so P: (m, k) and Q: (r, k) are both quantised per column.
  k is capped at the short side r (then only quantisation error remains).
  """
  rank: int = 4
  name = "lowrank"

  def __post_init__(self):
    if int(self.rank) < 1:
      raise ValueError(f"lowrank codec needs rank >= 1, got {self.rank}")

  def to_dict(self) -> dict:
    return {"name": self.name, "rank": int(self.rank)}

  def _dims(self, shape):
    shape = tuple(shape)
    transpose = _long_axis(shape) == -1
    m, r = (shape[-1], shape[-2]) if transpose else (shape[-2], shape[-1])
    return shape[:-2], m, r, min(int(self.rank), r), transpose

  def parts(self, shape) -> dict:
    lead, m, r, k, _ = self._dims(shape)
    return {"p": Part(lead + (m, k), "int8"), "p_scale": Part(lead + (1, k), "float32"),
            "q": Part(lead + (r, k), "int8"), "q_scale": Part(lead + (1, k), "float32")}

  def encode(self, x) -> dict:
    _, _, _, k, transpose = self._dims(x.shape)
    mat = x.astype(jnp.float32)
    if transpose:
      mat = jnp.swapaxes(mat, -1, -2)
    # The top-k right singular vectors from the small (r, r) Gram matrix: XLA's
    # CPU SVD of (m, r) matrices is ~50x slower, and P = M V_k is exact.
    gram = jnp.einsum("...mi,...mj->...ij", mat, mat,
                      precision=jax.lax.Precision.HIGHEST)
    _, vecs = jnp.linalg.eigh(gram)  # Ascending eigenvalues.
    q = vecs[..., ::-1][..., :k]  # (..., r, k) orthonormal columns.
    p = jnp.einsum("...mi,...ik->...mk", mat, q,
                   precision=jax.lax.Precision.HIGHEST)  # (..., m, k) = U_k S_k.
    pq, ps = _quantize(p, -2)
    qq, qs = _quantize(q, -2)
    return {"p": pq, "p_scale": ps, "q": qq, "q_scale": qs}

  def decode(self, parts: dict, shape) -> jax.Array:
    p = _dequantize(parts["p"], parts["p_scale"])
    q = _dequantize(parts["q"], parts["q_scale"])
    mat = jnp.einsum("...mk,...rk->...mr", p, q,
                     precision=jax.lax.Precision.HIGHEST)  # (..., m, r)
    return jnp.swapaxes(mat, -1, -2) if self._dims(shape)[-1] else mat


def make(name: str, *, rank: int = 4, step: float = 0.4, level: int = 3):
  """A codec by name: fp32 | bf16 | int8 | qzstd (step, level) | lowrank (rank)."""
  if name == "fp32":
    return Fp32()
  if name == "bf16":
    return Bf16()
  if name == "int8":
    return Int8()
  if name == "qzstd":
    return QZstd(step=float(step), level=int(level))
  if name == "lowrank":
    return LowRank(rank=int(rank))
  raise ValueError(f"unknown bank codec {name!r}; choose from {NAMES}")


def from_config(bank_config):
  """From the config's `bank` section (codec, qzstd_step, qzstd_level, lowrank_rank)."""
  return make(str(bank_config.codec), rank=int(bank_config.lowrank_rank),
              step=float(bank_config.qzstd_step), level=int(bank_config.qzstd_level))


def from_dict(d: dict):
  """Inverse of `codec.to_dict()` (as stored in a bank manifest)."""
  return make(d["name"], **{k: v for k, v in d.items() if k != "name"})


def nbytes_per_row(codec, leaf_shapes: dict) -> int:
  """Bytes one document takes in the arrays before zstd (exact for raw parts)."""
  total = 0
  for shape in leaf_shapes.values():
    for part in codec.parts(shape).values():
      dtype = ml_dtypes.bfloat16 if part.dtype == "bfloat16" else part.dtype
      total += int(np.prod(part.shape)) * np.dtype(dtype).itemsize
  return total
