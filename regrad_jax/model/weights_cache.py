"""Dequantised GGUF models cached once as safetensors, keyed by the GGUF's sha256.

Reading a GGUF costs seconds on every load (the tokenizer fields are parsed one
string at a time, then every tensor is dequantised). The first load writes what it
built to

  $REGRAD_CACHE/weights/<sha256 of the GGUF file>.safetensors

the param tree in the loader's layout (float32, nested dict keys joined by "/"),
with the ModelConfig fields, the tokenizer (tokenizer.json text, specials, chat
template), a crc32 of the tensor bytes and the tree's fingerprint (fingerprint.py)
in the safetensors metadata. Later loads read that file one tensor at a time
into JAX arrays (well under a second for SmolLM2; peak memory the params plus
one tensor).

  read(gguf_path, expected_shapes, dtype) -> (params, config, tokenizer) | None
  write(gguf_path, params, config, tokenizer) -> the cache file, or None

Safety: the file is written to a temporary name in the cache folder and renamed
into place (atomic; concurrent writers produce the same bytes); a file that is
truncated, has a wrong header, a tensor shape that the current loader does not
expect, or a checksum mismatch is refused with a warning and rebuilt. Reading a
GGUF creates nothing but this cache (and its sha256.json, the GGUF hashes by path,
size, mtime and inode). REGRAD_WEIGHTS_CACHE=0 turns it off;
REGRAD_WEIGHTS_CACHE=/some/folder moves it (the tests use a folder in /tmp).
"""
import concurrent.futures
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
  """sha256 of a file's bytes (0.1 s for SmolLM2's 98 MB GGUF).

  Remembered in the cache folder's sha256.json by (real path, size, mtime_ns,
  inode), so a load does not hash an unchanged file again; a changed file
  changes that key and is hashed afresh.
  """
  path = pathlib.Path(path).resolve()
  st = path.stat()
  key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
  memo_file = cache_dir() / "sha256.json" if enabled() else None
  try:
    memo = json.loads(memo_file.read_text()) if memo_file else {}
  except (OSError, ValueError):
    memo = {}
  if isinstance(memo, dict) and isinstance(memo.get(key), str):
    return memo[key]
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      h.update(block)
  memo = {k: v for k, v in memo.items() if not k.startswith(f"{path}|")} if isinstance(memo, dict) else {}
  memo[key] = h.hexdigest()
  if memo_file:  # Best effort: the memo is an optimisation.
    from regrad_jax.bank import store  # Its atomic JSON write (lazy: tensorstore).
    try:
      memo_file.parent.mkdir(parents=True, exist_ok=True)
      store.write_json_atomic(memo_file, memo)
    except OSError as e:
      logging.warning("weights cache: cannot write %s (%s)", memo_file, e)
  return memo[key]


def cache_path(gguf_path) -> pathlib.Path:
  """Where the dequantised copy of `gguf_path` lives (keyed by its content)."""
  return cache_dir() / f"{file_sha256(gguf_path)}.safetensors"


def _crc(name: str, arr: np.ndarray, crc: int) -> int:
  crc = zlib.crc32(name.encode(), crc)
  return zlib.crc32(memoryview(np.ascontiguousarray(arr)).cast("B"), crc)


def _checksum(flat: dict[str, np.ndarray]) -> str:
  """crc32 over the tensors' bytes in name order (independent of file layout)."""
  crc = 0
  for name in sorted(flat):
    crc = _crc(name, flat[name], crc)
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
  from regrad_jax.bank.compute import flatten  # The bank's "a/b" leaf names.
  flat = {n: np.asarray(a) for n, a in flatten(params).items()}
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


def _read_file(path: pathlib.Path, to_array=lambda x: x, meanwhile=None
               ) -> tuple[dict, dict, str, object]:
  """Reads a cache file: (name -> to_array(float32 array), metadata, crc32,
  meanwhile(metadata) or None).

  meanwhile: work that needs only the metadata (the caller's expected layout),
  run on this thread after the reads, while the checksum thread catches up.

  Tensors are read one at a time into a fresh buffer (in name order, the order
  of `_checksum`) and handed to `to_array` (e.g. jax.device_put): the peak is the
  params plus one tensor, not params plus a mapped copy of the file.
  Raises ValueError on anything that is not a complete, well-formed file.
  """
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(head, "little")
    if 8 + n > size:
      raise ValueError(f"header of {n} bytes exceeds the file ({size} bytes)")
    header = json.loads(f.read(n))
    meta = header.pop("__metadata__", {}) or {}
    spans, end = {}, 8 + n
    for name, info in header.items():
      if info["dtype"] != "F32":
        raise ValueError(f"tensor {name!r} is {info['dtype']}, not F32")
      start, stop = (8 + n + int(o) for o in info["data_offsets"])
      shape = tuple(int(d) for d in info["shape"])
      if stop - start != 4 * int(np.prod(shape)) or stop > size:
        raise ValueError(f"tensor {name!r}: offsets do not fit its shape or the file")
      spans[name], end = (start, shape), max(end, stop)
    if end != size:
      raise ValueError(f"{size - end} bytes after the last tensor (a damaged file)")
    # The crc runs on a worker thread (zlib releases the GIL), one tensor behind
    # the reads; FIFO order keeps it the name-order checksum of `_checksum`.
    flat, crc = {}, [0]
    def update(name, buf):
      crc[0] = _crc(name, buf, crc[0])
    with concurrent.futures.ThreadPoolExecutor(1) as worker:
      for name in sorted(spans):
        start, shape = spans[name]
        buf = np.empty(shape, np.float32)
        f.seek(start)
        if f.readinto(memoryview(buf).cast("B")) != buf.nbytes:
          raise ValueError(f"tensor {name!r} is cut short")
        done = worker.submit(update, name, buf)
        flat[name] = to_array(buf)
        del buf
      extra = meanwhile(meta) if meanwhile else None
      done.result()  # The last update (and any error) after all earlier ones.
  return flat, meta, f"{crc[0]:08x}", extra


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
  from regrad_jax.bank.compute import flatten, unflatten  # "a/b" leaf names.
  from regrad_jax.model.tokenizer import Tokenizer
  try:
    def layout(meta):  # -> (config, the loader's {name: shape} for it).
      if meta.get("format") != FORMAT:
        raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
      fields = json.loads(meta["config"])
      if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = tuple(fields["rope_scaling"])
      config = ModelConfig(**fields)
      return config, {n: tuple(s.shape) for n, s in flatten(expected_shapes(config)).items()}
    flat, meta, crc, (config, want) = _read_file(path, jax.device_put, layout)
    got = {n: a.shape for n, a in flat.items()}
    if want != got:
      diff = sorted(set(want.items()) ^ set(got.items()))[:2]
      raise ValueError(f"param layout differs from this loader's, e.g. {diff}")
    if crc != meta.get("crc32"):
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
  params = unflatten(flat)
  # The checksum proved these are the bytes hashed at write time: not hashed again.
  fingerprint.remember(params, meta["fingerprint"])
  return params, config.replace(dtype=dtype), tokenizer
