"""LoRA as a separate parameter tree (gemma style: plain tree surgery).

A LoRA tree maps each target projection name to {"a": A, "b": B}, stacked over the
contiguous layer range [start, stop) that carries adapters:

  A: (n, d_in, r)    B: (n, r, d_out)      n = stop - start

The adapted projection is  y = x @ W + (alpha / r) * (x @ A) @ B.  A is initialised
like PEFT (kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(d_in), 1/sqrt(d_in))) and B
is zero, so a fresh tree leaves the model unchanged. A *batched* tree (leaves with a
query axis after the layer axis: A (n, Q, d_in, r)) gives each example of a batch its
own adapter: that is how many queries, each with its own retrieved gradients, share
one forward without a weight copy per query.
"""
import dataclasses

import jax
import jax.numpy as jnp

from regrad_jax.model.config import ModelConfig

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which layers and projections carry adapters, and their rank.

  Attributes:
    rank: r.
    alpha: lora_alpha; the update is scaled by alpha / r.
    start, stop: the decoder layers [start, stop) with adapters.
    targets: projection names, a subset of TARGETS.
  """
  rank: int
  alpha: float
  start: int
  stop: int
  targets: tuple[str, ...] = ("gate", "up", "down")

  def __post_init__(self):
    bad = [t for t in self.targets if t not in TARGETS]
    if bad:
      raise ValueError(f"unknown LoRA targets {bad}; choose from {TARGETS}")
    if not 0 <= self.start < self.stop:
      raise ValueError(f"LoRA layer range [{self.start}, {self.stop}) is empty")
    if self.rank <= 0:
      raise ValueError(f"LoRA rank must be positive, got {self.rank}")

  @property
  def scale(self) -> float:
    """alpha / r, the factor on (x @ A) @ B."""
    return self.alpha / self.rank

  @property
  def num_layers(self) -> int:
    """n = stop - start, the leading dimension of every leaf."""
    return self.stop - self.start

  @classmethod
  def from_config(cls, c, model_config: ModelConfig) -> "LoraConfig":
    """Builds from a config section (rank, alpha, layers, targets).

    layers == (-1, -1) selects the upper half of the decoder, as in the reference.
    """
    start, stop = tuple(c.layers)
    if (start, stop) == (-1, -1):
      start, stop = model_config.n_layers // 2, model_config.n_layers
    if stop > model_config.n_layers:
      raise ValueError(f"LoRA layers [{start}, {stop}) exceed the model's "
                       f"{model_config.n_layers} layers")
    return cls(rank=int(c.rank), alpha=float(c.alpha), start=int(start),
               stop=int(stop), targets=tuple(c.targets))


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
  """(d_in, d_out) of each projection, in the x @ W layout used by the model."""
  d, q, kv, f = (config.d_model, config.n_heads * config.head_dim,
                 config.n_kv_heads * config.head_dim, config.d_ff)
  return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d),
          "gate": (d, f), "up": (d, f), "down": (f, d)}


def init_lora(key: jax.Array, config: ModelConfig, lcfg: LoraConfig) -> dict:
  """A fresh LoRA tree: PEFT-style A, zero B (the model is unchanged)."""
  shapes = projection_shapes(config)
  tree = {}
  for name, k in zip(lcfg.targets, jax.random.split(key, len(lcfg.targets))):
    d_in, d_out = shapes[name]
    bound = 1.0 / d_in**0.5
    tree[name] = {
        "a": jax.random.uniform(k, (lcfg.num_layers, d_in, lcfg.rank),
                                jnp.float32, -bound, bound),
        "b": jnp.zeros((lcfg.num_layers, lcfg.rank, d_out), jnp.float32),
    }
  return tree


def pad_to_top(lora: dict, lcfg: LoraConfig, n_layers: int
               ) -> tuple[dict, LoraConfig]:
  """Zero-pads a LoRA tree from its adapted layers [start, stop) up to the top layer.

  The decoder runs layers [0, start) in a LoRA-free scan (their output does not
  depend on LoRA, so gradients never backpropagate through them) and [start, L) in
  one scan with one compiled body; layers at or above `stop` get a zero adapter,
  which contributes exactly 0 (rank-r extra matmuls). Works for plain (n, d_in, r)
  and batched (n, Q, d_in, r) leaves. Returns the padded tree and the config that
  describes it ([start, L)); a tree that already reaches the top is returned as is,
  so callers may pad once outside a decode loop.
  """
  after = n_layers - lcfg.stop
  if after == 0:
    return lora, lcfg
  pad = lambda x: jnp.pad(x, [(0, after)] + [(0, 0)] * (x.ndim - 1))
  return jax.tree.map(pad, lora), dataclasses.replace(lcfg, stop=n_layers)


def merge_into_base(params: dict, lora: dict, lcfg: LoraConfig) -> dict:
  """Returns NEW base params with W + scale * A @ B folded in (inputs untouched).

  Used to check the per-example adapted forward and for baselines that need a
  single merged weight set (e.g. weight-distance drift).
  """
  layers = dict(params["layers"])
  for name, ab in lora.items():
    delta = lcfg.scale * jnp.einsum("ldr,lrf->ldf", ab["a"], ab["b"])
    w = layers[name]
    layers[name] = w.at[lcfg.start:lcfg.stop].add(delta.astype(w.dtype))
  return {**params, "layers": layers}
