"""Tests for regrad_jax.model.loaders and gguf_tokenizer: round trips and bad input.

Checkpoints are written by the tests themselves with NumPy weights: a Hugging Face
folder (safetensors + config.json + tokenizer.json) and a GGUF of the *same*
weights with gguf.GGUFWriter (q/k rows permuted as llama.cpp's converter does,
some tensors Q8_0), so both loaders must produce identical params.
"""
import json
import pathlib

import gguf
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from regrad_jax.model import gguf_tokenizer, loaders
from regrad_jax.model.config import tiny_config
from regrad_jax.model.tokenizer import ByteTokenizer, Tokenizer

# A byte-level BPE vocabulary: 3 control tokens, the 256 byte symbols, 3 merges.
_ALPHABET = list(gguf_tokenizer._byte_alphabet().values())
TOKEN_FIELDS = {
    "model": "gpt2", "pre": "smollm",
    "tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + _ALPHABET
              + ["Ġt", "he", "Ġthe"],
    "token_type": [3, 3, 3] + [1] * 259,
    "merges": ["Ġ t", "h e", "Ġt he"],
}
VOCAB = len(TOKEN_FIELDS["tokens"])  # 262
BOS, EOS = 1, 2
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def hf_config(**kw) -> dict:
  """A tiny Llama config.json (d_model 32 so rows fit Q8_0's 32-wide blocks)."""
  cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB,
             hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             rms_norm_eps=1e-5, rope_theta=10_000.0, tie_word_embeddings=True,
             hidden_act="silu", bos_token_id=BOS, eos_token_id=EOS,
             max_position_embeddings=256)
  cfg.update(kw)
  return cfg


def hf_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random float32 weights under Hugging Face names, (out, in) layout."""
  rng = np.random.default_rng(seed)
  D, F, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
  hd = cfg["head_dim"]
  Q, KV = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
  r = lambda *shape: rng.normal(0, 0.5, shape).astype(np.float32)
  w = {"model.embed_tokens.weight": r(cfg["vocab_size"], D),
       "model.norm.weight": 1 + r(D)}
  if not cfg["tie_word_embeddings"]:
    w["lm_head.weight"] = r(cfg["vocab_size"], D)
  for i in range(L):
    p = f"model.layers.{i}."
    w.update({p + "self_attn.q_proj.weight": r(Q, D), p + "self_attn.k_proj.weight": r(KV, D),
              p + "self_attn.v_proj.weight": r(KV, D), p + "self_attn.o_proj.weight": r(D, Q),
              p + "mlp.gate_proj.weight": r(F, D), p + "mlp.up_proj.weight": r(F, D),
              p + "mlp.down_proj.weight": r(D, F), p + "input_layernorm.weight": 1 + r(D),
              p + "post_attention_layernorm.weight": 1 + r(D)})
    if cfg["model_type"] == "qwen2":
      w.update({p + "self_attn.q_proj.bias": r(Q), p + "self_attn.k_proj.bias": r(KV),
                p + "self_attn.v_proj.bias": r(KV)})
  return w


def write_tokenizer(folder: pathlib.Path) -> None:
  """tokenizer.json + tokenizer_config.json for the test vocabulary."""
  gguf_tokenizer.build_tokenizer(TOKEN_FIELDS).save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
       "chat_template": CHAT_TEMPLATE}))


def write_hf(folder: pathlib.Path, cfg: dict, weights: dict) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(cfg))
  save_file(weights, str(folder / "model.safetensors"))
  write_tokenizer(folder)
  return folder


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf permutation of q/k rows (what the loader undoes)."""
  hd = w.shape[0] // n_heads
  return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_Q8 = gguf.GGMLQuantizationType.Q8_0
QUANTIZED = ("token_embd.weight", "ffn_gate.weight")  # Stored as Q8_0.


def write_gguf(path: pathlib.Path, cfg: dict, weights: dict) -> pathlib.Path:
  """The same model as a GGUF file: llama.cpp names, permutations, some Q8_0."""
  arch = cfg["model_type"]
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg["num_hidden_layers"])
  w.add_context_length(cfg["max_position_embeddings"])
  w.add_embedding_length(cfg["hidden_size"])
  w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(cfg["num_attention_heads"])
  w.add_head_count_kv(cfg["num_key_value_heads"])
  w.add_rope_dimension_count(cfg["head_dim"])
  w.add_rope_freq_base(cfg["rope_theta"])
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  w.add_vocab_size(cfg["vocab_size"])
  w.add_tokenizer_model(TOKEN_FIELDS["model"])
  w.add_tokenizer_pre(TOKEN_FIELDS["pre"])
  w.add_token_list(TOKEN_FIELDS["tokens"])
  w.add_token_types(TOKEN_FIELDS["token_type"])
  w.add_token_merges(TOKEN_FIELDS["merges"])
  w.add_bos_token_id(BOS)
  w.add_eos_token_id(EOS)
  w.add_chat_template(CHAT_TEMPLATE)
  names = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
  hf_layer = {v: k for k, v in loaders._HF_LAYER.items()}  # HF suffix -> ours.
  for name, arr in weights.items():
    if name in names:
      out = names[name]
    else:
      _, _, i, rest = name.split(".", 3)
      ours = hf_layer[rest]
      out = f"blk.{i}.{loaders._GGUF_LAYER[ours]}"
      if arch == "llama" and ours in ("q", "k"):
        arr = _permute(arr, cfg["num_attention_heads"] if ours == "q"
                       else cfg["num_key_value_heads"])
    if out.endswith(QUANTIZED):
      w.add_tensor(out, gguf.quants.quantize(arr, _Q8), raw_dtype=_Q8)
    else:
      w.add_tensor(out, arr)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _q8(x: np.ndarray) -> np.ndarray:
  return gguf.quants.dequantize(gguf.quants.quantize(x, _Q8), _Q8)


# --------------------------------------------------------------- round trips


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_gguf_and_hf_give_the_same_model(tmp_path, model_type):
  tied = model_type == "llama"
  cfg = hf_config(model_type=model_type, tie_word_embeddings=tied,
                  architectures=[loaders.HF_ARCHITECTURES[model_type]])
  weights = hf_weights(cfg)
  p_hf, c_hf, tok_hf = loaders.load_hf(write_hf(tmp_path / "hf", cfg, weights))
  p_gg, c_gg, tok_gg = loaders.load_gguf(write_gguf(tmp_path / "m.gguf", cfg, weights))

  assert c_hf == c_gg
  assert (c_hf.arch, c_hf.tie_embeddings, c_hf.qkv_bias) == (model_type, tied, not tied)
  assert (c_hf.n_layers, c_hf.d_model, c_hf.n_heads, c_hf.n_kv_heads, c_hf.head_dim,
          c_hf.d_ff, c_hf.vocab_size) == (2, 32, 4, 2, 8, 64, VOCAB)
  assert (c_gg.bos_id, c_gg.eos_id, c_gg.norm_eps) == (BOS, EOS, 1e-5)
  assert jax.tree.structure(p_hf) == jax.tree.structure(p_gg)
  # The HF side is exact: our layout is the transpose of HF's.
  np.testing.assert_array_equal(p_hf["layers"]["q"][1],
                                weights["model.layers.1.self_attn.q_proj.weight"].T)
  np.testing.assert_array_equal(p_hf["embed"], weights["model.embed_tokens.weight"])
  # The GGUF side is exact for F32 tensors, and equals Q8_0 rounding for the others.
  for path, a in jax.tree_util.tree_leaves_with_path(p_hf):
    name = jax.tree_util.keystr(path)
    b = p_gg
    for k in path:
      b = b[k.key]
    if "gate" in name:
      np.testing.assert_array_equal(b, np.swapaxes(_q8(np.swapaxes(np.asarray(a), 1, 2)), 1, 2))
    elif "embed" in name:
      np.testing.assert_array_equal(b, _q8(np.asarray(a)))
    else:
      np.testing.assert_array_equal(a, b, err_msg=name)

  # Same vocabulary, same ids; digits split one by one, control tokens whole.
  text = "<|im_start|>the 2024 the<|im_end|>"
  assert tok_hf.encode(text) == tok_gg.encode(text)
  ids = tok_gg.encode(text)
  assert ids[0] == BOS and ids[-1] == EOS and VOCAB - 1 in ids  # "Ġthe" merged.
  assert tok_gg.encode("2024") == [tok_gg._tok.token_to_id(c) for c in "2024"]
  assert tok_gg.decode(tok_gg.encode("the 2024 thé")) == "the 2024 thé"
  assert tok_gg.chat_template == CHAT_TEMPLATE


def test_gguf_tokenizer_refuses_unknown_kinds():
  with pytest.raises(ValueError, match="tokenizer.ggml.model='llama'"):
    gguf_tokenizer.build_tokenizer({**TOKEN_FIELDS, "model": "llama"})
  with pytest.raises(ValueError, match="unknown pre-tokenizer.*'mystery'"):
    gguf_tokenizer.build_tokenizer({**TOKEN_FIELDS, "pre": "mystery"})


# --------------------------------------------------------------- bad GGUF


def test_truncated_gguf_is_refused(tmp_path):
  cfg = hf_config()
  good = write_gguf(tmp_path / "m.gguf", cfg, hf_weights(cfg)).read_bytes()
  for cut in (3, 100, len(good) // 2, len(good) - 7):
    bad = tmp_path / f"cut{cut}.gguf"
    bad.write_bytes(good[:cut])
    with pytest.raises(ValueError, match=f"{bad.name}.*(truncated or corrupt)"):
      loaders.load_gguf(bad)


def test_gguf_missing_and_unsupported(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    loaders.load_gguf(tmp_path / "nope.gguf")
  w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma3")
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match="unsupported architecture 'gemma3'"):
    loaders.load_gguf(tmp_path / "g.gguf")


# --------------------------------------------------------------- bad HF folders


def test_hf_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    loaders.load_hf(tmp_path / "absent")
  cfg = hf_config()
  folder = write_hf(tmp_path / "m", cfg, hf_weights(cfg))
  (folder / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    loaders.load_hf(folder)
  (folder / "pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(ValueError, match="pickle"):
    loaders.load_hf(folder)


def test_hf_sharded_and_missing_shard(tmp_path):
  cfg = hf_config()
  weights = hf_weights(cfg)
  folder = write_hf(tmp_path / "m", cfg, weights)
  (folder / "model.safetensors").unlink()
  names = sorted(weights)
  shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
  for file, part in shards.items():
    save_file({n: weights[n] for n in part}, str(folder / file))
  (folder / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {n: f for f, part in shards.items() for n in part}}))
  params, _, _ = loaders.load_hf(folder)
  np.testing.assert_array_equal(params["layers"]["down"][0],
                                weights["model.layers.0.mlp.down_proj.weight"].T)
  (folder / "b.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="b.safetensors"):
    loaders.load_hf(folder)


@pytest.mark.parametrize("change,message", [
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
     "unsupported architecture 'GPT2LMHeadModel'"),
    (dict(architectures=["LlamaForSequenceClassification"]),
     "unsupported architecture 'LlamaForSequenceClassification'"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling type 'yarn'"),
    (dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=64),
     "sliding_window=64 is shorter"),
])
def test_hf_unsupported_configs(tmp_path, change, message):
  cfg = hf_config()
  folder = write_hf(tmp_path / "m", {**cfg, **change}, hf_weights(cfg))
  with pytest.raises(ValueError, match=message):
    loaders.load_hf(folder)


def test_mistral_window_covering_the_sequence_is_accepted(tmp_path):
  cfg = hf_config(model_type="mistral", architectures=["MistralForCausalLM"],
                  sliding_window=4096)
  _, config, _ = loaders.load_hf(write_hf(tmp_path / "m", cfg, hf_weights(cfg)),
                                 max_seq_len=512)
  assert config.arch == "mistral"


def test_hf_shape_mismatch_names_tensor_and_shapes(tmp_path):
  cfg = hf_config()
  folder = write_hf(tmp_path / "m", {**cfg, "intermediate_size": 48}, hf_weights(cfg))
  with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.weight' has "
                     r"shape \(32, 64\), the config implies \(32, 48\)"):
    loaders.load_hf(folder)


def test_hf_missing_and_unexpected_tensors(tmp_path):
  cfg = hf_config()
  weights = hf_weights(cfg)
  missing = dict(weights)
  del missing["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
    loaders.load_hf(write_hf(tmp_path / "a", cfg, missing))
  extra = {**weights, "model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)}
  with pytest.raises(ValueError, match="unexpected tensors.*o_proj.bias"):
    loaders.load_hf(write_hf(tmp_path / "b", cfg, extra))
  untied = hf_config(tie_word_embeddings=False)
  with pytest.raises(ValueError, match="missing tensor 'lm_head.weight'"):
    loaders.load_hf(write_hf(tmp_path / "c", untied, weights))


def test_truncated_safetensors_names_the_file(tmp_path):
  cfg = hf_config()
  folder = write_hf(tmp_path / "m", cfg, hf_weights(cfg))
  file = folder / "model.safetensors"
  data = file.read_bytes()
  for cut in (5, len(data) // 2):
    file.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupt"):
      loaders.load_hf(folder)


def test_bf16_safetensors_become_float32(tmp_path):
  import ml_dtypes
  cfg = hf_config()
  weights = {k: v.astype(ml_dtypes.bfloat16) for k, v in hf_weights(cfg).items()}
  params, _, _ = loaders.load_hf(write_hf(tmp_path / "m", cfg, weights))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
  np.testing.assert_array_equal(
      params["layers"]["v"][1],
      weights["model.layers.1.self_attn.v_proj.weight"].astype(np.float32).T)


# Base fingerprints of these folders (hf_weights seed 3) as computed by the
# pre-Flax, hand-written-dict decoder (commit 2b83205): released meta-states and
# banks record such fingerprints, so the Flax param tree must hash the same.
_LEGACY_FINGERPRINTS = {("llama", "hf"): "38f725677b0280c8",
                        ("llama", "gguf"): "93502a1e177f2cb0",
                        ("qwen2", "hf"): "cd03696d1d2cc42a",
                        ("qwen2", "gguf"): "5145166754308c4e"}


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_fingerprints_match_the_legacy_param_tree(tmp_path, model_type):
  cfg = hf_config(model_type=model_type, tie_word_embeddings=model_type == "llama",
                  architectures=[loaders.HF_ARCHITECTURES[model_type]])
  weights = hf_weights(cfg, seed=3)
  hf, _, _ = loaders.load_hf(write_hf(tmp_path / "m", cfg, weights))
  gg, _, _ = loaders.load_gguf(write_gguf(tmp_path / "m.gguf", cfg, weights))
  assert loaders.base_fingerprint(hf) == _LEGACY_FINGERPRINTS[model_type, "hf"]
  assert loaders.base_fingerprint(gg) == _LEGACY_FINGERPRINTS[model_type, "gguf"]


# --------------------------------------------------------------- load_model


def test_load_model_dispatch(tmp_path):
  from ml_collections import ConfigDict
  params, config, tok = loaders.load_model(ConfigDict(dict(source="tiny",
                                                           dtype="bfloat16")))
  assert isinstance(tok, ByteTokenizer)
  assert config == tiny_config(dtype="bfloat16")
  assert (config.vocab_size, config.bos_id, config.eos_id, config.pad_id) == (
      tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id)
  again, _, _ = loaders.load_model(ConfigDict(dict(source="tiny")))
  other, _, _ = loaders.load_model(ConfigDict(dict(source="tiny", seed=1)))
  assert loaders.base_fingerprint(params) == loaders.base_fingerprint(again)
  assert loaders.base_fingerprint(params) != loaders.base_fingerprint(other)

  cfg = hf_config()
  folder = write_hf(tmp_path / "m", cfg, hf_weights(cfg))
  _, config, tok = loaders.load_model(ConfigDict(dict(source="hf", path=str(folder),
                                                      dtype="float32")))
  assert isinstance(tok, Tokenizer) and config.vocab_size == VOCAB
  with pytest.raises(ValueError, match="needs config.model.path"):
    loaders.load_model(ConfigDict(dict(source="hf", path="")))
  with pytest.raises(ValueError, match="unknown config.model.source 'bert'"):
    loaders.load_model(ConfigDict(dict(source="bert")))
