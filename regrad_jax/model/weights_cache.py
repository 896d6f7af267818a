"""Dequantised GGUF models cached once as safetensors, keyed by the GGUF's sha256.

Reading a GGUF costs seconds on every load (the tokenizer fields are parsed one
string at a time, then every tensor is dequantised). The first load writes what it
built to

  $REGRAD_CACHE/weights/<sha256 of the GGUF file>.safetensors

the param tree in the loader's layout (float32, nested dict keys joined by "/"),
with the ModelConfig fields, the tokenizer (tokenizer.json text, specials, chat
template), a crc32 of the tensor bytes and the tree's fingerprint (fingerprint.py)
in the safetensors metadata. Later loads
map that file and copy each tensor once into a JAX array (well under a second
for SmolLM2).

  read(gguf_path, expected_shapes, dtype) -> (params, config, tokenizer) | None
  write(gguf_path, params, config, tokenizer) -> the cache file, or None

Safety: the file is written to a temporary name in the cache folder and renamed
into place (atomic; concurrent writers produce the same bytes); a file that is
truncated, has a wrong header, a tensor shape that the current loader does not
expect, or a checksum mismatch is refused with a warning and rebuilt. Reading a
GGUF creates nothing but this cache. REGRAD_WEIGHTS_CACHE=0 turns it off;
REGRAD_WEIGHTS_CACHE=/some/folder moves it (the tests use a folder in /tmp).
"""
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import tempfile
import zlib

import numpy as np

from regrad_jax import fingerprint
from regrad_jax.model.config import ModelConfig

FORMAT = "regrad_jax.weights_cache/1"  # Bump when the entry layout changes.
_SEP = "/"


_OFF, _ON = ("0", "off", "false", "no"), ("", "1", "on", "true", "yes")


def enabled() -> bool:
  """False when $REGRAD_WEIGHTS_CACHE is 0 / off / false / no."""
  return os.environ.get("REGRAD_WEIGHTS_CACHE", "").lower() not in _OFF


def cache_dir() -> pathlib.Path:
  """$REGRAD_WEIGHTS_CACHE when it names a folder, else $REGRAD_CACHE/weights."""
  value = os.environ.get("REGRAD_WEIGHTS_CACHE", "")
  if value.lower() not in _ON:
    return pathlib.Path(value).expanduser()
  from regrad_jax import registry  # Pulls in pip / zip handling only when needed.
  return registry.cache_root() / "weights"


def file_sha256(path) -> str:
  """sha256 of a file's bytes (0.1 s for SmolLM2's 98 MB GGUF)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      h.update(block)
  return h.hexdigest()


def cache_path(gguf_path) -> pathlib.Path:
  """Where the dequantised copy of `gguf_path` lives (keyed by its content)."""
  return cache_dir() / f"{file_sha256(gguf_path)}.safetensors"


def _flatten(tree: dict, prefix: str = "") -> dict:
  """{"layers": {"q": x}} -> {"layers/q": x} (leaves unchanged)."""
  out = {}
  for key, value in tree.items():
    if _SEP in key:
      raise ValueError(f"param name {key!r} contains {_SEP!r}")
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}{_SEP}"))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _unflatten(flat: dict) -> dict:
  tree = {}
  for name, value in flat.items():
    *parents, leaf = name.split(_SEP)
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _checksum(flat: dict[str, np.ndarray]) -> str:
  """crc32 over the tensors' bytes in name order (independent of file layout)."""
  crc = 0
  for name in sorted(flat):
    crc = zlib.crc32(name.encode(), crc)
    crc = zlib.crc32(memoryview(np.ascontiguousarray(flat[name])).cast("B"), crc)
  return f"{crc:08x}"


def write(gguf_path, params: dict, config: ModelConfig, tokenizer) -> pathlib.Path | None:
  """Stores a freshly built model for `gguf_path`; returns the file (None if off).

  params: the loader's nested dict of float32 arrays; tokenizer: a
  model.tokenizer.Tokenizer. Failing to write (read-only disk, full disk) only
  warns: the cache is an optimisation.
  """
  if not enabled():
    return None
  from safetensors.numpy import save_file
  target = cache_path(gguf_path)
  flat = {n: np.asarray(a) for n, a in _flatten(params).items()}
  bad = sorted(n for n, a in flat.items() if a.dtype != np.float32)
  if bad:
    raise ValueError(f"weights cache stores float32 params only; {bad[0]} is "
                     f"{flat[bad[0]].dtype}")
  meta = {"format": FORMAT, "config": json.dumps(dataclasses.asdict(config)),
          "tokenizer": tokenizer.to_str(),
          "specials": json.dumps([tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id]),
          "chat_template": json.dumps(tokenizer.chat_template),
          "add_bos": json.dumps(bool(tokenizer.add_bos_default)),
          "name": tokenizer.name, "crc32": _checksum(flat),
          "fingerprint": fingerprint.tree_fingerprint(params)}
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
      save_file(flat, tmp, metadata=meta)
      os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared.
      os.replace(tmp, target)  # Atomic: readers see the old file or the whole new one.
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
  except OSError as e:
    logging.warning("weights cache: cannot write %s (%s); loads stay uncached", target, e)
    return None
  return target


def _parse(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict]:
  """Maps a safetensors file: (name -> read-only float32 view, metadata).

  Raises ValueError on anything that is not a complete, well-formed file.
  """
  size = path.stat().st_size
  if size < 8:
    raise ValueError("shorter than a safetensors header")
  data = np.memmap(path, dtype=np.uint8, mode="r")
  n = int(np.frombuffer(data[:8], "<u8")[0])
  if 8 + n > size:
    raise ValueError(f"header of {n} bytes exceeds the file ({size} bytes)")
  header = json.loads(bytes(data[8:8 + n]))
  meta = header.pop("__metadata__", {}) or {}
  flat, end = {}, 0
  for name, info in header.items():
    if info["dtype"] != "F32":
      raise ValueError(f"tensor {name!r} is {info['dtype']}, not F32")
    start, stop = (8 + n + int(o) for o in info["data_offsets"])
    shape = tuple(int(d) for d in info["shape"])
    if stop - start != 4 * int(np.prod(shape)) or stop > size:
      raise ValueError(f"tensor {name!r}: offsets do not fit its shape or the file")
    flat[name] = data[start:stop].view(np.float32).reshape(shape)
    end = max(end, stop)
  if end != size:
    raise ValueError(f"{size - end} bytes after the last tensor (a damaged file)")
  return flat, meta


def read(gguf_path, expected_shapes, dtype: str = "float32"):
  """The cached (params, config, tokenizer) for `gguf_path`, or None.

  Args:
    gguf_path: the GGUF file (hashed to find its entry).
    expected_shapes: ModelConfig -> the param tree of shapes (ShapeDtypeStructs
      or arrays) that the current loader builds; an entry that differs (another
      layout, another version) is refused.
    dtype: compute dtype for the returned ModelConfig.
  Returns:
    None when disabled, absent, or refused (damaged; a warning names why), so the
    caller rebuilds and `write`s a fresh copy.
  """
  if not enabled():
    return None
  path = cache_path(gguf_path)
  if not path.is_file():
    return None
  import jax
  import tokenizers
  from regrad_jax.model.tokenizer import Tokenizer
  try:
    flat, meta = _parse(path)
    if meta.get("format") != FORMAT:
      raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
    fields = json.loads(meta["config"])
    if fields.get("rope_scaling") is not None:
      fields["rope_scaling"] = tuple(fields["rope_scaling"])
    config = ModelConfig(**fields)
    want = {n: tuple(s.shape) for n, s in _flatten(expected_shapes(config)).items()}
    got = {n: a.shape for n, a in flat.items()}
    if want != got:
      diff = sorted(set(want.items()) ^ set(got.items()))[:2]
      raise ValueError(f"param layout differs from this loader's, e.g. {diff}")
    if _checksum(flat) != meta.get("crc32"):
      raise ValueError("checksum mismatch (damaged file)")
    bos, eos, pad = json.loads(meta["specials"])
    tokenizer = Tokenizer(tokenizers.Tokenizer.from_str(meta["tokenizer"]), bos_id=bos,
                          eos_id=eos, pad_id=pad,
                          chat_template=json.loads(meta["chat_template"]),
                          add_bos=json.loads(meta["add_bos"]), name=meta["name"])
  except (ValueError, KeyError, TypeError, OSError) as e:
    logging.warning("weights cache: refusing %s (%s); rebuilding it from %s",
                    path, e, gguf_path)
    return None
  params = _unflatten({n: _owned_device_array(jax, a) for n, a in flat.items()})
  # The checksum proved these are the bytes hashed at write time: not hashed again.
  fingerprint.remember(params, meta["fingerprint"])
  return params, config.replace(dtype=dtype), tokenizer


def _owned_device_array(jax, view: np.ndarray):
  """view copied once into a JAX array that does not alias the mapped file (a CPU
  backend may adopt an aligned host buffer; the file may be replaced later)."""
  x = jax.device_put(view)
  if np.shares_memory(np.asarray(x), view):
    x = jax.device_put(np.array(view))
  return x

