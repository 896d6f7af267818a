"""Architecture description of a Llama-family decoder (Llama 2/3, SmolLM, Qwen2, Mistral)."""
import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A frozen description of the architecture; hashable, so it can be a static jit arg.

  Attributes:
    vocab_size: rows of the embedding table.
    d_model: residual width D.
    n_layers: decoder layers L.
    n_heads: query heads H.
    n_kv_heads: key/value heads (grouped-query attention: H % n_kv_heads == 0).
    head_dim: per-head width (usually D // H).
    d_ff: SwiGLU hidden width F.
    rope_theta: RoPE base frequency.
    rope_scaling: None, or ("llama3", factor, low_freq_factor, high_freq_factor,
      original_max_position_embeddings) for Llama 3.1+ frequency scaling.
    norm_eps: RMSNorm epsilon.
    tie_embeddings: logits use the embedding table (no separate lm_head).
    qkv_bias: q/k/v projections carry a bias (Qwen2).
    dtype: compute dtype name ("float32" or "bfloat16"); params stay float32.
    matmul_dtype: operand dtype of the projections and LM head ("float32", or
      "bfloat16": bf16 operands, float32 sums; 2-5x faster matmuls on CPUs with
      AMX / AVX512-BF16, see transformer._matmul). Part of a bank's identity.
    bos_id / eos_id / pad_id: special token ids.
    arch: source architecture name, for error messages and fingerprints.
  """
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  rope_theta: float = 10_000.0
  rope_scaling: tuple[Any, ...] | None = None
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  qkv_bias: bool = False
  dtype: str = "float32"
  matmul_dtype: str = "float32"
  bos_id: int = 1
  eos_id: int = 2
  pad_id: int = 0
  arch: str = "llama"

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
    if self.matmul_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"matmul_dtype must be float32 or bfloat16, got {self.matmul_dtype!r}")

  def replace(self, **kw) -> "ModelConfig":
    """A copy with the given fields changed (validated again)."""
    return dataclasses.replace(self, **kw)


def tiny_config(vocab_size: int = 259, **kw) -> ModelConfig:
  """A 4-layer random model for unit tests (compiles in about a second)."""
  base = dict(vocab_size=vocab_size, d_model=32, n_layers=4, n_heads=4,
              n_kv_heads=2, head_dim=8, d_ff=64, rope_theta=10_000.0,
              norm_eps=1e-5, tie_embeddings=True, bos_id=256, eos_id=257,
              pad_id=258, arch="tiny")
  base.update(kw)
  return ModelConfig(**base)
