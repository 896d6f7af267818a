"""On-disk pieces of a bank: TensorStore arrays, the manifest, commit markers, a lock.

Layout of a bank directory:

  manifest.json          written only by the chief (atomic replace)
  arrays/<leaf>/<part>/  one zarr3 array per LoRA leaf and codec part; the leading
                         dimension is the bank row, chunks hold `rows_per_chunk`
                         whole rows (1 by default: reading K rows touches K chunks)
  commits/*.json         one marker per committed batch, from any process: the rows
                         it completed and the rows it refused. The chief folds
                         markers into the manifest and then deletes them.
  write.lock             flock'ed by the one process allowed to change the manifest

NB: a batch's rows become visible only through a marker, and a marker is written
only after TensorStore has committed (and fsync'ed) every chunk of the batch. A
process killed at any point therefore leaves rows that are either complete and
marked, or unmarked and recomputed by the next build; never a marked partial row.

Damage. Arrays are opened with `fill_missing_data_reads: False` (a deleted chunk
is a read error, never zeros), new arrays store zstd chunks with their checksum,
and every committed row carries `row_checksum` (its id and stored bytes), which
the bank verifies on each read: a truncated or flipped chunk is an error naming
the row, never a gradient.
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import pathlib
import time
import uuid
import zlib

import numpy as np
import tensorstore as ts

# One context for every array of every bank: shared cache and I/O limits.
CONTEXT = ts.Context({"file_io_concurrency": {"limit": 128}})


def array_spec(path, shape=None, dtype: str | None = None, rows_per_chunk: int = 1,
               zstd: int = 0) -> dict:
  """The one TensorStore spec helper: a zarr3 array on the local file system.

  Args:
    path: the array's directory.
    shape: (rows, *row_shape) to create it; None to open an existing array.
    dtype: zarr3 data type name ("float32", "bfloat16", "int8") when creating.
    rows_per_chunk: rows per chunk along the leading (row) dimension; every
      other dimension is whole in a chunk.
    zstd: zstd level of each chunk (0: stored raw).
  """
  # NB: a chunk that is not there is an error, not the fill value (a deleted chunk
  # file would otherwise read back as a zero gradient).
  spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)},
          "fill_missing_data_reads": False}
  if shape is not None:
    spec["metadata"] = {
        "shape": [int(s) for s in shape],
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {
            "chunk_shape": [int(rows_per_chunk)] + [int(s) for s in shape[1:]]}},
        "chunk_key_encoding": {"name": "default",
                               "configuration": {"separator": "."}},
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}] + (
            [{"name": "zstd", "configuration": {"level": int(zstd), "checksum": True}}]
            if zstd else []),
        "fill_value": 0,
    }
  return spec


def create_array(path, shape, dtype: str, rows_per_chunk: int, zstd: int = 0
                 ) -> ts.TensorStore:
  """Creates the array, replacing leftovers of a bank creation that crashed
  (callers create arrays only while no manifest exists)."""
  return ts.open(array_spec(path, shape, dtype, rows_per_chunk, zstd), create=True,
                 delete_existing=True, context=CONTEXT).result()


def open_array(path) -> ts.TensorStore:
  """Opens an existing bank array (shape and dtype come from its metadata)."""
  return ts.open(array_spec(path), open=True, context=CONTEXT).result()


def grow_array(array: ts.TensorStore, rows: int) -> ts.TensorStore:
  """Extends the row dimension to `rows` (metadata only; never shrinks)."""
  if rows <= array.shape[0]:
    return array
  return array.resize(exclusive_max=[rows] + [None] * (array.ndim - 1),
                      expand_only=True, resize_metadata_only=True).result()


def fsync_dir(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_json_atomic(path, obj) -> None:
  """Writes JSON to a temporary file, fsyncs, and renames it over `path`."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  with open(tmp, "w") as f:
    json.dump(obj, f, separators=(",", ":"))
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  fsync_dir(path.parent)


def read_json(path):
  """Loads a JSON file (manifest or marker); ValueError naming the file if it is
  not valid JSON."""
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is damaged (not valid JSON: {e})") from e


def json_sha(obj) -> str:
  """sha256 of an object's canonical JSON (sorted keys): integrity hashes."""
  text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def row_checksum(doc_id: str, parts: dict) -> str:
  """The checksum of one stored row: its id and the bytes of each part.

  Args:
    doc_id: the row's id (bound in: a row served under another id fails).
    parts: {array name: (*row_shape) array} the stored parts of the row.
  NB: CRC-32 (zlib), read straight from the arrays' buffers: it detects damage
  (a flipped bit, a truncated or swapped chunk) at ~1 GB/s, 4-5x faster than
  sha256 here, which matters on every read (a SmolLM2 qzstd row is 1.5 MB). The
  manifest and the catalog, which name the rows, carry sha256 hashes.
  """
  crc = zlib.crc32(doc_id.encode("utf-8", "surrogatepass"))
  for name in sorted(parts):
    crc = zlib.crc32(name.encode(), crc)
    crc = zlib.crc32(np.ascontiguousarray(parts[name]).reshape(-1).view(np.uint8), crc)
  return f"crc32:{crc:08x}"


def write_marker(commits_dir, writer: str, complete, refused: dict, truncated=(),
                 checksums: dict | None = None) -> None:
  """Records one committed batch.

  Args:
    commits_dir: the bank's commits/ folder.
    writer: a name for the writing process (the file name's prefix).
    complete: rows whose chunks are all committed.
    refused: {row: reason} rows refused (nothing written for them).
    truncated: rows (complete or refused) whose text was cut to max_len.
    checksums: {row: row_checksum} of the complete rows.
  """
  name = f"{writer}-{uuid.uuid4().hex}.json"
  write_json_atomic(pathlib.Path(commits_dir) / name,
                    {"complete": [int(r) for r in complete],
                     "refused": {str(int(r)): why for r, why in refused.items()},
                     "truncated": [int(r) for r in truncated],
                     "checksums": {str(int(r)): c for r, c in (checksums or {}).items()}})


def list_markers(commits_dir) -> list[pathlib.Path]:
  """Sorted commit markers in `commits_dir` (temporary dot-files excluded; [] if
  the folder does not exist)."""
  d = pathlib.Path(commits_dir)
  return sorted(p for p in d.glob("*.json") if not p.name.startswith(".")) if d.is_dir() else []


def read_markers(paths) -> list[tuple[pathlib.Path, dict]]:
  """Reads markers, skipping any the chief folded and deleted meanwhile."""
  out = []
  for p in paths:
    try:
      out.append((p, read_json(p)))
    except FileNotFoundError:
      continue
  return out


@contextlib.contextmanager
def writer_lock(directory, timeout: float = 0.0, name: str = "write.lock"):
  """Exclusive right to change what `directory` holds (released on exit or death).

  Args:
    timeout: seconds to wait for another writer to finish (0: fail at once).
  Raises:
    RuntimeError: another process holds the lock (after `timeout`).
  """
  path = pathlib.Path(directory) / name
  deadline = time.monotonic() + float(timeout)
  with open(path, "a") as f:
    while True:
      try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
          raise
        if time.monotonic() >= deadline:
          raise RuntimeError(f"{directory} is being written by another process "
                             f"(waited {timeout:g} s for {path})") from e
        time.sleep(0.05)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def directory_bytes(path) -> int:
  """Bytes of all files under `path` (the bank's size on disk)."""
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.stat(os.path.join(root, name)).st_size
      except FileNotFoundError:
        continue
  return total
