"""Per-document LoRA gradients at theta*: g_d = grad_theta L_LM(d; theta*).

A document is tokenised exactly as meta-training sees a passage
(`prompts.encode_document`: "Passage 1: <text>", truncated to max_len tokens) and
padded to the smallest length bucket that fits, so a few jit shapes cover any
corpus. A jitted step takes a batch of documents of one bucket, split over the
mesh's "data" axis, and returns each document's gradient already encoded by the
bank's codec:

  tokens (G, S) int32, mask (G, S) bool
    -> per-document value_and_grad(lm_loss) w.r.t. the LoRA tree (one theta*
       copy per document in a batched LoRA tree, see `_doc_gradients`)
    -> per-document finite flag and loss, codec parts {leaf: {part: (G, ...)}}

G = batch_size x (devices on "data"). Padding documents (all-False mask) have loss 0
and a zero gradient; they are dropped on the host. The mesh holds this process's
devices only: documents are independent, so each process of a multi-host build
computes its own rows with no collectives and no lock-step with other hosts.
"""
import dataclasses
import functools
import hashlib
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from regrad_jax import fingerprint
from regrad_jax import parallel
from regrad_jax import prompts
from regrad_jax.model import losses, transformer
from regrad_jax.model.config import ModelConfig
from regrad_jax.model.lora import LoraConfig


def tokenize_documents(tokenizer, texts, max_len: int, buckets, *,
                       index: int | None = 1
                       ) -> list[tuple[np.ndarray, np.ndarray, bool]]:
  """Tokenises passages the way meta-training does, padded to length buckets.

  Each text goes through `prompts.encode_document` ("Passage i: <text>", BOS as
  the tokenizer wants it, cut to its first `max_len` tokens), the one encoding
  meta-training also uses.

  Args:
    tokenizer: a regrad_jax tokenizer (encode, pad_id, add_bos_default).
    texts: iterable of str.
    max_len: token limit (config.data.max_context_len).
    buckets: padded lengths (config.data.doc_buckets); the largest must be
      >= max_len so every truncated document fits.
    index: the passage number in "Passage i: " (1 for a stored document; None:
      the raw text, config.bank.raw_text).

  Returns:
    One (tokens (L,) int32, mask (L,) bool, truncated) per text, L the smallest
    bucket >= the token count; tokens are right-padded with pad_id.
  """
  buckets = sorted(int(b) for b in buckets)
  if max_len < 2:
    raise ValueError(f"max_len must be >= 2, got {max_len}")
  if not buckets or buckets[-1] < max_len:
    raise ValueError(f"the largest document bucket {buckets[-1:]} is shorter "
                     f"than max_len={max_len}")
  out = []
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(f"document {i}: text must be a str, got {type(text).__name__}")
    ids, truncated = prompts.encode_document(tokenizer, text, max_len, index=index)
    length = next(b for b in buckets if b >= len(ids))
    tokens = np.full((length,), tokenizer.pad_id, np.int32)
    tokens[:len(ids)] = ids
    mask = np.zeros((length,), bool)
    mask[:len(ids)] = True
    out.append((tokens, mask, truncated))
  return out


def flatten(tree) -> dict:
  """{"gate": {"a": x}} -> {"gate/a": x}: the bank's leaf names."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(str(k.key) for k in path): leaf for path, leaf in flat}


def unflatten(flat: dict) -> dict:
  """Inverse of `flatten` for nested dicts."""
  tree = {}
  for name, leaf in flat.items():
    *outer, last = name.split("/")
    node = tree
    for key in outer:
      node = node.setdefault(key, {})
    node[last] = leaf
  return tree


def text_sha(text: str) -> str:
  """Content hash of a document's text (tells a changed document from the same one)."""
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


_FIELDS = {"model": "base model (weights + architecture)", "theta": "theta* (LoRA)",
           "lora": "LoRA config", "tokenizer": "tokenizer",
           "max_len": "max context length", "prompt": "passage format"}


# ModelConfig fields added after banks were first written: left out of a bank's
# identity at their default, so banks built before them stay readable.
_LATER_FIELDS = ("matmul_dtype",)


def _config_repr(config: ModelConfig) -> str:
  """repr(config), without the _LATER_FIELDS that are at their default."""
  fields = [(f.name, getattr(config, f.name)) for f in dataclasses.fields(config)
            if not (f.name in _LATER_FIELDS and getattr(config, f.name) == f.default)]
  return f"{type(config).__name__}(" + ", ".join(f"{n}={v!r}" for n, v in fields) + ")"


@dataclasses.dataclass(frozen=True)
class Identity:
  """Everything a stored gradient depends on, as fingerprints.

  A bank refuses to be read or extended with gradients of a different identity.
  """
  model: str
  theta: str
  lora: str
  tokenizer: str
  max_len: int
  prompt: str

  @classmethod
  def of(cls, params, model_config: ModelConfig, lora, lora_config: LoraConfig,
         tokenizer, max_len: int, index: int | None = 1) -> "Identity":
    """Fingerprints the base params + config, theta* (`lora`), LoRA config,
    tokenizer, max_len and passage format into an Identity."""
    return cls(
        model=fingerprint.combine(params=fingerprint.tree_fingerprint(params),
                                  config=_config_repr(model_config)),
        theta=fingerprint.tree_fingerprint(lora),
        lora=repr(lora_config),
        tokenizer=str(tokenizer.fingerprint()),
        max_len=int(max_len),
        prompt=("<bos>" if tokenizer.add_bos_default else "")
        + ("{text}" if index is None else prompts.passage_text(index, "{text}")))

  def to_dict(self) -> dict:
    """The fields as a JSON-ready dict (stored in the bank manifest)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Identity":
    """Inverse of `to_dict`."""
    return cls(**d)

  def mismatches(self, other: "Identity") -> list[str]:
    """Human-readable names of the fields that differ from `other`."""
    return [f"{_FIELDS[f]} (bank {getattr(self, f)!r}, given {getattr(other, f)!r})"
            for f in _FIELDS if getattr(self, f) != getattr(other, f)]


# Documents per forward/backward inside one jitted step (per device), and what
# its backward saves (transformer.REMAT_MODES). SmolLM2, 8 x 128 tokens, 2 idle
# CPU cores (`python -m benchmarks.bank_step --variants=4:none,4:dots,2:dots,4:full`):
# XLA temp memory 0.885 / 0.428 / 0.225 / 0.296 GB at 1.00 / 1.05 / 0.98 / 1.10x
# the step time. Peak RSS of a whole build (benchmarks.bank_build, 16 documents):
# 1.96 GB (4, "none") -> 1.27 GB with a warm compile cache (1.50 GB compiling).
MICRO_BATCH = 2
REMAT = "dots"


def _doc_gradients(params, lora, tokens, mask, *, model_config, lora_config, codec,
                   micro_batch=MICRO_BATCH, remat=REMAT):
  """(G, S) tokens/mask -> (codec parts per leaf, finite (G,), loss (G,)).

  micro_batch: documents per forward/backward inside the step (G when it does
  not divide G). Piece c takes rows c, c + C, c + 2C, ... (C = G / micro_batch),
  so with G split over the data axis every device works on every piece.

  Per-document gradients through a batched LoRA tree (leaves (n, G, ...), one
  copy of theta* per document; see model/lora.py): the gradient of
  sum_d L_LM(d; theta_d) w.r.t. theta_d is exactly g_d, because documents never
  interact in the forward. One batched forward and backward; on 2 CPU cores this
  measured 1.3x faster than vmap(value_and_grad) over single documents and 1.5x
  faster than one document per call (SmolLM2, 8 x 96 tokens). A non-finite
  document cannot spoil the others: the sum's cotangent is 1 for each term.
  """
  G = tokens.shape[0]
  m = micro_batch if 0 < micro_batch < G and G % micro_batch == 0 else G

  def grads_of(chunk):  # (m, S) documents -> ((m,) losses, {leaf: (m, n, ...)}).
    toks, msk = chunk
    per_doc = jax.tree.map(
        lambda x: jnp.broadcast_to(x[:, None], (x.shape[0], m) + x.shape[1:]), lora)

    def total(theta_d):
      loss = losses.lm_loss(params, theta_d, toks, msk, config=model_config,
                            lora_config=lora_config, remat=remat)
      return jnp.sum(loss), loss

    (_, loss), grads = jax.value_and_grad(total, has_aux=True)(per_doc)
    return loss, {k: jnp.swapaxes(g, 0, 1) for k, g in flatten(grads).items()}

  # Micro-batches run one after another: the same flops, and only one micro-
  # batch's activations (and (m, S, V) logits) alive in the backward pass.
  C = G // m
  pieces = lambda x: x.reshape((m, C) + x.shape[1:]).swapaxes(0, 1)  # (C, m, ...)
  rows = lambda x: x.swapaxes(0, 1).reshape((G,) + x.shape[2:])  # Inverse.
  loss, flat = jax.lax.map(grads_of, (pieces(tokens), pieces(mask)))
  loss, flat = rows(loss), {k: rows(g) for k, g in flat.items()}  # (G,), (G, n, ...)
  finite = jnp.isfinite(loss)
  for g in flat.values():
    finite &= jnp.all(jnp.isfinite(g.reshape(g.shape[0], -1)), axis=1)
  return {k: codec.encode(g) for k, g in flat.items()}, finite, loss


@functools.lru_cache(maxsize=16)
def _jitted_step(model_config, lora_config, codec, mesh):
  """One jitted step per static setting, shared by every computer that uses it.

  A cache of compiled functions (not of state): a new computer for other params
  or another theta* of the same shapes reuses the compiled program. Inputs arrive
  already placed (params by the rules in parallel.py, theta* replicated, the
  batch split over "data"), and jit keeps those shardings.
  """
  return jax.jit(
      functools.partial(_doc_gradients, model_config=model_config,
                        lora_config=lora_config, codec=codec,
                        micro_batch=MICRO_BATCH * mesh.shape[parallel.DATA]),
      out_shardings=parallel.data_sharded(mesh))


class GradientComputer:
  """Encoded per-document gradients at theta*, in sharded, bucketed batches.

  Holds the params and theta* placed on the mesh and one jitted step (compiled
  once per bucket length). The bank calls `tokenize`, `batches` and the computer
  itself; nothing here touches storage.

  Attributes:
    identity: what the gradients depend on (stored in and checked by the bank).
    lora_config: the LoRA layout of theta*.
    codec: how the step encodes gradients.
    leaf_shapes: {"gate/a": (n, d_in, r), ...} per-document gradient shapes.
    global_batch: documents per step, batch_size x data-axis devices.
  """

  def __init__(self, params, lora, *, model_config: ModelConfig,
               lora_config: LoraConfig, tokenizer, codec, max_len: int,
               buckets, batch_size: int = 8, mesh=None, raw_text: bool = False):
    if mesh is None:
      mesh = parallel.make_mesh(devices=jax.local_devices())
    foreign = [d for d in mesh.devices.flat if d.process_index != jax.process_index()]
    if foreign:
      raise ValueError("the bank mesh must hold only this process's devices "
                       f"(each host computes its own rows); got {foreign[:3]}")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.mesh = mesh
    self.lora_config = lora_config
    self.codec = codec
    self.tokenizer = tokenizer
    self.max_len = int(max_len)
    self.index = None if raw_text else 1  # "Passage 1: <text>" or the raw text.
    self.buckets = tuple(sorted(int(b) for b in buckets))
    self.global_batch = int(batch_size) * mesh.shape[parallel.DATA]
    self.leaf_shapes = {k: tuple(v.shape) for k, v in flatten(lora).items()}
    self.identity = Identity.of(params, model_config, lora, lora_config, tokenizer,
                                max_len, self.index)
    self._params = parallel.shard_params(params, mesh,
                                         transformer.logical_axes(model_config))
    self._lora = jax.device_put(lora, parallel.replicated(mesh))
    self._data = parallel.data_sharded(mesh)
    self._step = _jitted_step(model_config, lora_config, codec, mesh)

  def tokenize(self, texts) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """(tokens (L,) int32, mask (L,) bool, truncated) per text; see
    `tokenize_documents` (this computer's tokenizer, max_len and buckets)."""
    return tokenize_documents(self.tokenizer, texts, self.max_len, self.buckets,
                              index=self.index)

  def batches(self, rows, tokenized) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Packs documents into full batches of `global_batch`, longest first.

    Documents are sorted by bucket (longest first, then by row) and taken
    `global_batch` at a time; a batch is padded to the bucket of its longest
    document. So only the last batch has padding rows: grouping by bucket
    instead left a part-empty batch per bucket (8 documents over 3 buckets cost
    3 full steps). A document padded to a longer bucket has the same gradient
    (causal attention, padding masked out of the loss) up to float rounding.

    Args:
      rows: bank row of each document.
      tokenized: matching (tokens, mask, truncated) from `tokenize`.
    Yields:
      (rows (n,) int64, tokens (G, S) int32, mask (G, S) bool): the first n
      documents are real, the rest padding.
    """
    docs = sorted(((int(r), t, m) for r, (t, m, _) in zip(rows, tokenized)),
                  key=lambda item: (-len(item[1]), item[0]))
    G = self.global_batch
    for start in range(0, len(docs), G):
      chunk = docs[start:start + G]
      length = len(chunk[0][1])
      tokens = np.full((G, length), self.tokenizer.pad_id, np.int32)
      mask = np.zeros((G, length), bool)
      for i, (_, t, m) in enumerate(chunk):
        tokens[i, :len(t)], mask[i, :len(m)] = t, m
      yield np.array([c[0] for c in chunk], np.int64), tokens, mask

  def __call__(self, tokens: np.ndarray, mask: np.ndarray):
    """Dispatches one batch (asynchronously): -> (parts, finite (G,), loss (G,))."""
    tokens, mask = jax.device_put((tokens, mask), self._data)
    return self._step(self._params, self._lora, tokens, mask)
