"""Tests for regrad_jax.model.weights_cache: a GGUF dequantised once, mapped after.

A tiny GGUF (tests/test_loaders.write_gguf) is loaded with the cache in a temp
$REGRAD_CACHE: the cached load must equal a fresh dequantisation bit for bit
(params, config, tokenizer), and a damaged or foreign cache file must be refused
and rebuilt, never used.
"""
import logging
import os

import jax
import numpy as np
import pytest

from regrad_jax import fingerprint
from regrad_jax.model import loaders, transformer, weights_cache
from tests.test_loaders import CHAT_TEMPLATE, hf_config, hf_weights, write_gguf


@pytest.fixture
def gguf_file(tmp_path, monkeypatch):
  monkeypatch.setenv("REGRAD_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv("REGRAD_WEIGHTS_CACHE", raising=False)
  cfg = hf_config(model_type="qwen2", tie_word_embeddings=False,
                  architectures=["Qwen2ForCausalLM"])
  return write_gguf(tmp_path / "m.gguf", cfg, hf_weights(cfg))


def _fresh(path, monkeypatch):
  """A load that bypasses the cache (the reference)."""
  with monkeypatch.context() as m:
    m.setenv("REGRAD_WEIGHTS_CACHE", "0")
    return loaders.load_gguf(path)


def _assert_same(a, b):
  (pa, ca, ta), (pb, cb, tb) = a, b
  assert jax.tree.structure(pa) == jax.tree.structure(pb)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype == np.float32 and x.shape == y.shape
    assert x.tobytes() == y.tobytes()  # Bit for bit.
  assert ca == cb
  assert ta.fingerprint() == tb.fingerprint()
  assert (ta.chat_template, ta.add_bos_default, ta.name) == (tb.chat_template,
                                                            tb.add_bos_default, tb.name)
  assert ta.encode("the cat the", add_bos=True) == tb.encode("the cat the", add_bos=True)


def test_cached_load_equals_fresh_dequantisation(gguf_file, monkeypatch):
  fresh = _fresh(gguf_file, monkeypatch)
  entry = weights_cache.cache_path(gguf_file)
  assert not entry.exists()  # Turned off: nothing written.
  first = loaders.load_gguf(gguf_file)  # Miss: builds and writes the entry.
  assert entry.is_file() and entry.name == weights_cache.file_sha256(gguf_file) + ".safetensors"
  # No temp file left; sha256.json remembers the GGUF's hash.
  assert sorted(p.name for p in entry.parent.iterdir()) == sorted([entry.name, "sha256.json"])
  assert weights_cache.read(gguf_file, transformer.param_shapes) is not None
  second = loaders.load_gguf(gguf_file, dtype="bfloat16")  # Hit.
  _assert_same(first, fresh)
  # The fingerprint remembered from the entry is the one hashing gives.
  assert loaders.base_fingerprint(second[0]) == fingerprint.tree_fingerprint(
      jax.tree.map(np.asarray, fresh[0]))
  assert second[1].dtype == "bfloat16"
  _assert_same((second[0], second[1].replace(dtype="float32"), second[2]), fresh)
  assert second[2].chat_template is None or second[2].chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("damage", ["flip", "truncate", "trailing"])
def test_damaged_cache_is_refused_and_rebuilt(gguf_file, monkeypatch, caplog, damage):
  fresh = _fresh(gguf_file, monkeypatch)
  loaders.load_gguf(gguf_file)
  entry = weights_cache.cache_path(gguf_file)
  good_tensors, good_meta, _, _ = weights_cache._read_file(entry, np.ndarray.tobytes)
  good = entry.read_bytes()
  bad = bytearray(good)
  if damage == "flip":
    bad[len(bad) - 100] ^= 0x40  # One bit of one weight.
  elif damage == "truncate":
    bad = bad[:-64]
  else:
    bad += b"\0" * 8
  entry.write_bytes(bytes(bad))
  with caplog.at_level(logging.WARNING):
    assert weights_cache.read(gguf_file, transformer.param_shapes) is None
  assert "refusing" in caplog.text and str(entry) in caplog.text
  _assert_same(loaders.load_gguf(gguf_file), fresh)  # Rebuilt from the GGUF...
  tensors, meta, _, _ = weights_cache._read_file(entry)  # ...and the entry repaired
  assert meta == good_meta and len(entry.read_bytes()) == len(good)  # (the header's
  for name, arr in good_tensors.items():  # key order varies from write to write).
    assert tensors[name].tobytes() == arr


def test_entry_with_another_layout_is_refused(gguf_file, caplog):
  loaders.load_gguf(gguf_file)

  def other_layout(config):
    shapes = transformer.param_shapes(config)
    shapes["layers"]["extra"] = shapes["layers"]["q"]
    return shapes

  with caplog.at_level(logging.WARNING):
    assert weights_cache.read(gguf_file, other_layout) is None
  assert "layout differs" in caplog.text


def test_changed_gguf_gets_its_own_entry(gguf_file, tmp_path):
  loaders.load_gguf(gguf_file)
  cfg = hf_config(model_type="qwen2", tie_word_embeddings=False,
                  architectures=["Qwen2ForCausalLM"])
  other = write_gguf(tmp_path / "other.gguf", cfg, hf_weights(cfg, seed=1))
  p_other, _, _ = loaders.load_gguf(other)
  p_first, _, _ = loaders.load_gguf(gguf_file)
  assert weights_cache.cache_path(other) != weights_cache.cache_path(gguf_file)
  assert not np.array_equal(p_other["embed"], p_first["embed"])


def test_sha256_is_remembered_until_the_file_changes(gguf_file, monkeypatch):
  import hashlib
  first = weights_cache.file_sha256(gguf_file)
  assert first == hashlib.sha256(gguf_file.read_bytes()).hexdigest()
  calls = []
  real = hashlib.sha256
  monkeypatch.setattr(hashlib, "sha256", lambda: calls.append(1) or real())
  assert weights_cache.file_sha256(gguf_file) == first and not calls  # Remembered.
  data = bytearray(gguf_file.read_bytes())
  data[-1] ^= 1
  gguf_file.write_bytes(bytes(data))  # Same size: the mtime / inode key changes.
  os.utime(gguf_file, ns=(1, 1))
  assert weights_cache.file_sha256(gguf_file) == real(bytes(data)).hexdigest() and calls


def test_fingerprint_is_remembered_only_for_the_same_arrays():
  import jax.numpy as jnp
  tree = {"a": jnp.arange(4, dtype=jnp.float32), "b": {"c": jnp.ones((2, 3), jnp.float32)}}
  host = jax.tree.map(np.array, tree)
  digest = fingerprint.tree_fingerprint(tree)
  assert digest == fingerprint.tree_fingerprint(host)  # Same bytes, hashed.
  assert fingerprint.tree_fingerprint(dict(tree)) == digest  # Same leaves: remembered.
  host["a"][0] = 9.0  # NumPy leaves can change in place: never remembered.
  assert fingerprint.tree_fingerprint(host) != digest
  changed = {**tree, "a": tree["a"].at[0].set(9.0)}  # A new leaf: hashed.
  assert fingerprint.tree_fingerprint(changed) == fingerprint.tree_fingerprint(host)
  fingerprint.remember(tree, "not-the-hash")  # What weights_cache.read relies on.
  assert fingerprint.tree_fingerprint(tree) == "not-the-hash"
