"""The Gradient Bank: one stored LoRA gradient per document, looked up by document id.

Rows and ids. Every document gradient lives in one row of the bank's arrays (see
store.py for the layout); rows are only ever appended, never rewritten once
complete. A row is *pending* (reserved, not yet committed), *complete*, *refused*
(its gradient was not finite) or *deleted* (tombstoned). The id index maps each id
to its latest complete, non-deleted row. That bookkeeping, and the manifest that
records it, is rows.RowTable; this module reads and writes the arrays around it:

  build(docs)    new id -> new row; same id, changed text -> new row (replace);
                 same id and text -> skipped if complete, resumed if pending.
  append(docs)   build, but an id already in the bank is an error.
  replace(docs)  recompute these ids into new rows (copy-on-write: readers keep
                 seeing the old row until the new one is complete).
  delete(ids)    tombstone their rows (arrays untouched).

When a new row for an id completes, the chief tombstones the id's older rows.
`transcode` copies the live rows into a fresh bank (another codec, or compaction).

Crash safety and resume. Only the chief (process 0) changes the manifest, under an
flock. It reserves rows for new documents first (growing the arrays), then every
process computes its `process_slice` of the pending rows and commits each batch:
TensorStore writes, then a commit marker (store.py). A build killed at any point
restarts with the same call and computes exactly the rows that have no marker.

Integrity. The manifest carries a sha256 of its own content (a valid-JSON edit,
e.g. two ids swapped or another lora_config, is refused naming the file) and a
checksum per committed row (store.row_checksum of its id and stored bytes),
verified on every read: a missing, truncated or altered chunk is a BankDamagedError
naming the rows, never a gradient. Opening never creates or deletes anything;
`create` refuses a folder that holds arrays without a manifest (a damaged bank),
and builds a new bank in a temporary folder renamed into place.

Readers. `Bank.open` loads the manifest plus any markers, so a reader sees every
committed row even while a build is running; `refresh()` picks up later commits.
`gather` reads the rows of many queries in one batch of asynchronous TensorStore
reads and decodes them (decoding happens on read).

Bad input. Document ids must be non-empty strings and unique within a call; text
must be a non-empty str (TypeError / ValueError before anything is written). A
document longer than max_len is truncated and its row recorded in the manifest's
`truncated` list. A non-finite gradient refuses its row: nothing is written, the
reason is recorded in `refused` and returned in the BuildReport; later builds
skip that document while its text is unchanged (`replace` retries it). A bank
opened with a different identity (base model, theta*, LoRA config, tokenizer,
max length, passage format) or codec raises BankMismatchError naming each
difference.
"""
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import pathlib
import time
import uuid
from typing import Callable

import jax
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from regrad_jax import fingerprint
from regrad_jax import parallel
from regrad_jax.bank import codecs
from regrad_jax.bank import compute
from regrad_jax.bank import rows as rows_lib
from regrad_jax.bank import store
# The manifest's format, name and damage error belong to rows.py; the bank's API.
from regrad_jax.bank.rows import FORMAT_VERSION, MANIFEST, BankDamagedError
REPAIR = "python -m launch.check_kb --workdir=WORKDIR --config=CONFIG --repair"


class BankMismatchError(ValueError):
  """The bank was built from other weights, theta*, tokenizer, ... or codec."""


# Threads that verify row checksums.
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))


@dataclasses.dataclass
class BuildReport:
  """What one build / append / replace call did (on this process).

  Attributes:
    computed: rows this process computed and committed.
    skipped: documents whose complete row already matched (chief only).
    appended: new ids given a row (chief only).
    replaced: ids given a new row that replaces a live one (chief only).
    refused: {id: reason} rows refused for a non-finite gradient.
    truncated: computed documents that were longer than max_len.
    seconds: wall time of the call.
  """
  computed: int = 0
  skipped: int = 0
  appended: int = 0
  replaced: int = 0
  refused: dict = dataclasses.field(default_factory=dict)
  truncated: int = 0
  seconds: float = 0.0

  @property
  def docs_per_s(self) -> float:
    """Computed rows per second of wall time (0.0 when no time was recorded)."""
    return self.computed / self.seconds if self.seconds > 0 else 0.0


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def validate_documents(docs) -> list[tuple[str, str]]:
  """Validates documents ((id, text) pairs or objects with .id and .text)."""
  pairs, empty, seen, dupes = [], [], set(), set()
  for i, d in enumerate(docs):
    if isinstance(d, tuple) and len(d) == 2:
      doc_id, text = d
    elif hasattr(d, "id") and hasattr(d, "text"):
      doc_id, text = d.id, d.text
    else:
      raise TypeError(f"document {i}: expected an (id, text) pair or an object "
                      f"with .id and .text, got {type(d).__name__}")
    if not isinstance(doc_id, str) or not doc_id:
      raise TypeError(f"document {i}: id must be a non-empty str, got {doc_id!r}")
    if not isinstance(text, str):
      raise TypeError(f"document {doc_id!r}: text must be a str, got {type(text).__name__}")
    for what, value in (("id", doc_id), ("text", text)):
      try:
        value.encode("utf-8")
      except UnicodeEncodeError as e:
        raise ValueError(f"document {doc_id!r}: its {what} is not valid Unicode "
                         f"({e.reason} at position {e.start}: {value[e.start]!r})") from None
    if not text.strip():
      empty.append(doc_id)
    if doc_id in seen:
      dupes.add(doc_id)
    seen.add(doc_id)
    pairs.append((doc_id, text))
  if dupes:
    raise ValueError(f"duplicate document ids: {sorted(dupes)[:10]}")
  if empty:
    raise ValueError(f"empty documents (no text to take a gradient of): {empty[:10]}")
  return pairs


def _lora_dict(lora_config) -> dict:
  """A LoraConfig (or its stored dict) as JSON-ready fields."""
  d = dict(lora_config) if isinstance(lora_config, dict) else dataclasses.asdict(lora_config)
  return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _check_queries(ids_per_query) -> list[list[str]]:
  if isinstance(ids_per_query, str) or any(isinstance(q, str) for q in ids_per_query):
    raise TypeError("expected a list of lists of ids (one list per query)")
  return [list(q) for q in ids_per_query]


@functools.partial(jax.jit, static_argnames=("codec", "shapes"))
def _decode(raw: dict, picks, *, codec, shapes: tuple) -> dict:
  """Decodes stored rows on the device, in one jitted call.

  Args:
    raw: {array name: (R, ...)} stored parts of R rows.
    picks: None for all R rows decoded, {leaf: (R, *shape)}; or (rows, weights),
      both (Q, K), for per-query sums {leaf: (Q, *shape)} of weights[q, k] x row
      rows[q, k] (weight 0 pads a query with fewer than K ids).
  Written as K gathers of decoded rows, XLA fuses dequantisation into one pass per
  leaf: 3x faster than a (Q, R) @ (R, ...) product over all decoded rows, and far
  faster than NumPy (SmolLM2 rows hold ~1.5M values).
  """
  out = {}
  for leaf, shape in shapes:
    parts = {p: raw[f"{leaf}/{p}"] for p in codec.parts(shape)}
    if picks is None:
      out[leaf] = codec.decode(parts, shape)
      continue
    rows, weights = picks
    out[leaf] = sum(
        weights[:, k].reshape((-1,) + (1,) * len(shape)) *
        codec.decode({p: x[rows[:, k]] for p, x in parts.items()}, shape)
        for k in range(rows.shape[1]))
  return out


class Bank:
  """A Gradient Bank directory; get one with `create`, `open` or `open_for`.

  Attributes:
    path: the bank directory.
    identity: compute.Identity the gradients were computed under.
    codec: the storage codec.
    leaf_shapes: {"gate/a": (n, d_in, r), ...} per-document gradient shapes.
  """

  def __init__(self, path):
    self.path = pathlib.Path(path)
    self._arrays = {}
    self._array_rows = -1
    self._rows: rows_lib.RowTable | None = None
    self._markers = []
    self.lock_timeout = 0.0  # Seconds a writer waits for another (0: fails at once).
    self.refresh()

  # --- Opening ------------------------------------------------------------------

  @classmethod
  def create(cls, path, *, identity: compute.Identity, codec, lora_config,
             leaf_shapes: dict, rows_per_chunk: int = 1) -> "Bank":
    """Creates an empty bank (fails if one exists at `path`).

    Args:
      identity: what the gradients will be computed under.
      codec: storage codec (codecs.make / codecs.from_config).
      lora_config: LoraConfig (or its manifest dict), recorded in the manifest.
      leaf_shapes: {"gate/a": (n, d_in, r), ...}.
      rows_per_chunk: rows per TensorStore chunk (1: a read of K rows touches
        exactly K chunks per array, and writers never share a chunk).
    """
    path = pathlib.Path(path)
    if (path / MANIFEST).exists():
      raise FileExistsError(f"a bank already exists at {path}")
    if path.exists() and any(path.iterdir()):
      raise FileExistsError(
          f"{path} is not empty but holds no {MANIFEST}: a damaged bank or another "
          f"folder; refusing to overwrite it (restore {path / MANIFEST}, or move the "
          "folder away to build a new bank)")
    # Built in a temporary sibling and renamed into place: a crash leaves either
    # no bank or a whole one, never arrays without a manifest.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.creating-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    (tmp / "commits").mkdir()
    leaf_shapes = {k: tuple(int(s) for s in v) for k, v in leaf_shapes.items()}
    for leaf, shape in leaf_shapes.items():
      for name, part in codec.parts(shape).items():
        store.create_array(tmp / "arrays" / leaf / name, (0,) + part.shape, part.dtype,
                           rows_per_chunk, part.zstd)
    ident = identity.to_dict()
    m = rows_lib.new_manifest({
        "codec": codec.to_dict(),
        "identity": ident,
        "fingerprint": fingerprint.combine(**{k: str(v) for k, v in ident.items()}),
        "lora_config": _lora_dict(lora_config),
        "leaf_shapes": {k: list(v) for k, v in leaf_shapes.items()},
        "rows_per_chunk": int(rows_per_chunk),
    })
    store.write_json_atomic(tmp / MANIFEST, m)
    if path.exists():
      path.rmdir()  # Empty (checked above).
    os.rename(tmp, path)
    store.fsync_dir(path.parent)
    return cls(path)

  @classmethod
  def open(cls, path, *, identity: compute.Identity | None = None,
           codec=None) -> "Bank":
    """Opens an existing bank; refuses another identity or codec when given."""
    path = pathlib.Path(path)
    if not (path / MANIFEST).exists():
      if (path / "arrays").exists():
        raise BankDamagedError(
            f"gradient bank {path} is damaged: {path / MANIFEST} is missing (its "
            f"arrays are there); restore the manifest, or move {path} away and "
            "rebuild with python -m launch.build_bank")
      raise FileNotFoundError(f"no gradient bank at {path} (missing {MANIFEST}; "
                              "build one with python -m launch.build_bank)")
    bank = cls(path)
    bank.check(identity=identity, codec=codec)
    return bank

  @classmethod
  def open_for(cls, path, computer: compute.GradientComputer, *,
               rows_per_chunk: int = 1) -> "Bank":
    """Opens the bank at `path` for `computer`'s gradients, creating it if absent
    (a write path: readers use `open`). A folder with arrays but no manifest is
    refused, never overwritten.

    Every process of a multi-process run calls this; the chief creates.
    """
    path = pathlib.Path(path)
    if parallel.is_chief() and not (path / MANIFEST).exists():
      cls.create(path, identity=computer.identity, codec=computer.codec,
                 lora_config=computer.lora_config, leaf_shapes=computer.leaf_shapes,
                 rows_per_chunk=rows_per_chunk)
    _barrier(f"bank-open:{path}")
    return cls.open(path, identity=computer.identity, codec=computer.codec)

  def check(self, *, identity: compute.Identity | None = None, codec=None) -> None:
    """Raises BankMismatchError naming every field that differs."""
    problems = []
    if identity is not None:
      problems += self.identity.mismatches(identity)
    if codec is not None and codec.to_dict() != self.codec.to_dict():
      problems.append(f"codec (bank {self.codec.to_dict()}, given {codec.to_dict()})")
    if identity is not None and repr(self._lora_config_obj()) != identity.lora:
      problems.append(f"LoRA config (bank manifest {self.lora_config}, given "
                      f"{identity.lora})")
    if problems:
      raise BankMismatchError(f"gradient bank {self.path} was built with a different "
                              + "; ".join(problems))

  # --- State --------------------------------------------------------------------

  def refresh(self) -> None:
    """Reloads the manifest and commit markers (sees rows committed since)."""
    marker_paths = store.list_markers(self.path / "commits")
    path = self.path / MANIFEST
    if not path.exists():
      raise BankDamagedError(f"gradient bank {self.path} is damaged: {path} is missing")
    m = store.read_json(path)
    markers = store.read_markers(marker_paths)
    self._rows = rows_lib.RowTable(m, [mk for _, mk in markers], bank=self.path,
                                   pinned=self._rows.pinned if self._rows else None)
    self._markers = [p for p, _ in markers]
    self.codec = codecs.from_dict(m["codec"])
    self.identity = compute.Identity.from_dict(m["identity"])
    self.leaf_shapes = {k: tuple(v) for k, v in m["leaf_shapes"].items()}
    n = self._rows.num_rows
    if n > self._array_rows:  # Reopen: rows were appended since.
      self._arrays = {f"{leaf}/{part}": store.open_array(self.path / "arrays" / leaf / part)
                      for leaf, shape in self.leaf_shapes.items()
                      for part in self.codec.parts(shape)}
      self._array_rows = n

  def pin(self, rows: dict[str, int], checksums: dict[int, str]) -> None:
    """Serves exactly `rows` {id: row} (a knowledge-base catalog's committed
    state), verified against `checksums` {row: checksum}, whatever later rows the
    manifest holds. BankDamagedError naming the ids whose row is not complete here."""
    self._rows.pin(rows, checksums)

  def unpin(self) -> None:
    """Serves the manifest's own latest rows again."""
    self._rows.unpin()

  def committed(self, ids) -> dict[str, tuple[int, str | None]]:
    """{id: (row, checksum)} of the bank's own latest complete rows of `ids` (the
    manifest's view, whatever is pinned); ids without one are left out."""
    return self._rows.committed(ids)

  def is_truncated(self, row: int) -> bool:
    """Whether a row's gradient was taken on a text cut to max_len."""
    return int(row) in self._rows.truncated

  def stored_checksums(self, rows) -> dict[int, str]:
    """{row: row_checksum} of the bytes stored now (rows with a recorded checksum
    are verified by the read; format-1 rows, which have none, are hashed)."""
    rows = np.unique(np.asarray(rows, np.int64))
    raw = self._read_raw(rows) if len(rows) else {}
    return {int(r): store.row_checksum(self._rows.row_id(r), {n: x[j] for n, x in raw.items()})
            for j, r in enumerate(rows)}

  def row_text_sha(self, row: int) -> str:
    """The text hash a row was computed from (compute.text_sha)."""
    return self._rows.text_sha(row)

  def row_id(self, row: int) -> str:
    """The document id a row was reserved for (deleted rows included)."""
    return self._rows.row_id(row)

  @property
  def ids(self) -> list[str]:
    """Ids with a complete gradient, in row order."""
    live = self._rows.live
    return sorted(live, key=live.get)

  def __len__(self) -> int:
    return len(self._rows.live)

  def __contains__(self, doc_id) -> bool:
    return doc_id in self._rows.live

  @property
  def num_rows(self) -> int:
    """Rows ever reserved (deleted and pending ones included)."""
    return self._rows.num_rows

  @property
  def fingerprint(self) -> str:
    """One hash of the identity (the parts are in `identity`)."""
    return self._rows.manifest["fingerprint"]

  def _lora_config_obj(self):
    from regrad_jax.model.lora import LoraConfig  # pylint: disable=g-import-not-at-top
    d = self._rows.manifest["lora_config"]
    return LoraConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

  @property
  def lora_config(self) -> dict:
    """A copy of the LoRA config fields stored in the manifest (JSON dict)."""
    return dict(self._rows.manifest["lora_config"])

  @property
  def refused(self) -> dict[str, str]:
    """{id: reason} for ids whose latest row was refused."""
    return self._rows.refused_ids()

  @property
  def num_truncated(self) -> int:
    """Live documents whose gradient was taken on a truncated text."""
    return sum(1 for r in self._rows.live.values() if r in self._rows.truncated)

  def rows_of(self, ids) -> np.ndarray:
    """Live rows of `ids`; KeyError naming the ids without a complete gradient."""
    live = self._rows.live
    missing = [i for i in ids if i not in live]
    if missing:
      more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
      raise KeyError(f"no gradient in bank {self.path} for ids {missing[:10]}{more}")
    return np.array([live[i] for i in ids], np.int64)

  def size_bytes(self) -> int:
    """Bytes on disk (arrays, manifest, markers)."""
    return store.directory_bytes(self.path)

  # --- Reading ------------------------------------------------------------------

  def _read_raw(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The stored parts of distinct `rows`, all arrays read concurrently. The row
    count is padded up to 2^j or 3 x 2^j (by repeating the last row) so that
    `_decode` compiles a few shapes and reads less than half as many rows again."""
    if not len(rows):  # One zero row (the queries give it weight 0).
      return {name: np.zeros((1,) + tuple(arr.shape[1:]), arr.dtype.numpy_dtype)
              for name, arr in self._arrays.items()}
    n = len(rows)
    size = min(b for j in range(n.bit_length() + 1) for b in (1 << j, 3 << j) if b >= n)
    padded = np.concatenate([rows, np.repeat(rows[-1:], size - n)])
    futures = {name: arr[padded].read() for name, arr in self._arrays.items()}
    try:
      raw = {name: f.result() for name, f in futures.items()}
    except (ValueError, RuntimeError) as e:  # TensorStore: missing / corrupt chunk.
      raise BankDamagedError(f"gradient bank {self.path}: rows {rows[:10].tolist()} "
                             f"cannot be read ({e}); repair: {REPAIR}") from e
    self._verify(rows, raw)
    return raw

  def _verify(self, rows: np.ndarray, raw: dict) -> None:
    """Checks each distinct read row against its recorded checksum (rows in
    parallel threads: zlib releases the GIL)."""
    table = self._rows

    def ok(j_r):
      j, r = j_r
      want = table.expected_checksum(r)
      if want is None:  # A format-1 bank: rows carry no checksum.
        return True
      return store.row_checksum(table.row_id(r), {n: x[j] for n, x in raw.items()}) == want
    rows = rows.tolist()
    bad = [r for r, good in zip(rows, _POOL.map(ok, enumerate(rows))) if not good]
    if bad:
      raise BankDamagedError(f"gradient bank {self.path}: rows {bad[:10]} (ids "
                             f"{[table.row_id(r) for r in bad[:10]]}) do not match "
                             f"their checksums; repair: {REPAIR}")

  def read_rows(self, rows) -> dict[str, np.ndarray]:
    """Decoded rows {leaf: (R, *shape) float32 NumPy}."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    uniq, inverse = np.unique(rows, return_inverse=True)
    out = _decode(self._read_raw(uniq), None, codec=self.codec,
                  shapes=tuple(self.leaf_shapes.items()))
    return {leaf: np.asarray(x)[inverse.reshape(-1)] for leaf, x in out.items()}

  def gather(self, ids_per_query) -> dict:
    """Gradients of K documents for each of Q queries, in one batched read.

    Args:
      ids_per_query: Q lists of K document ids each (the same K for all).
    Returns:
      A LoRA-shaped tree with leaves (Q, K, n, ...) float32.
    """
    ids_per_query = _check_queries(ids_per_query)
    ks = {len(q) for q in ids_per_query}
    if len(ks) > 1:
      raise ValueError(f"gather needs the same K for every query, got {sorted(ks)}; "
                       "use gather_sum for ragged queries")
    Q, K = len(ids_per_query), (ks.pop() if ks else 0)
    flat = self.read_rows(self.rows_of([i for q in ids_per_query for i in q]))
    return compute.unflatten({leaf: x.reshape((Q, K) + self.leaf_shapes[leaf])
                              for leaf, x in flat.items()})

  def gather_sum(self, ids_per_query) -> dict:
    """sum_k g_k per query, the adaptation step's input; K may differ per query.

    Returns:
      A LoRA-shaped tree with leaves (Q, n, ...) float32 jax.Arrays (zeros for no
      ids), left on the device for the adapted forward.
    """
    ids_per_query = _check_queries(ids_per_query)
    # A document several queries retrieved is read once; decoding and summing run
    # on the device in one call.
    uniq, where = np.unique(self.rows_of([i for q in ids_per_query for i in q]),
                            return_inverse=True)
    k = max([1] + [len(q) for q in ids_per_query])
    rows = np.zeros((len(ids_per_query), k), np.int32)
    weights = np.zeros((len(ids_per_query), k), np.float32)
    start = 0
    for q, ids in enumerate(ids_per_query):
      rows[q, :len(ids)] = where.reshape(-1)[start:start + len(ids)]
      weights[q, :len(ids)] = 1
      start += len(ids)
    return compute.unflatten(_decode(self._read_raw(uniq), (rows, weights),
                                     codec=self.codec, shapes=tuple(self.leaf_shapes.items())))

  # --- Writing ------------------------------------------------------------------

  def build(self, docs, computer: compute.GradientComputer, *, progress: bool = False,
            on_batch: Callable[[BuildReport], None] | None = None) -> BuildReport:
    """Makes the bank hold a gradient of each document (resumes, appends, replaces).

    Every process of a multi-process run calls this with the same documents.

    Args:
      docs: (id, text) pairs or objects with .id and .text.
      computer: computes the gradients; must match the bank's identity and codec.
      progress: show a progress bar (documents/s and ETA).
      on_batch: called with the running report after each committed batch.
    """
    return self._run(docs, computer, force=False, progress=progress, on_batch=on_batch)

  def append(self, docs, computer: compute.GradientComputer, **kw) -> BuildReport:
    """Adds new documents; an id that already has a gradient is an error.

    Rows an interrupted append reserved are resumed, not reported as present.
    """
    pairs = validate_documents(docs)
    self.refresh()
    present = [i for i, _ in pairs if i in self._rows.live]
    if present:
      raise ValueError(f"ids already in the bank (use replace): {present[:10]}")
    return self._run(pairs, computer, force=False, **kw)

  def replace(self, docs, computer: compute.GradientComputer, **kw) -> BuildReport:
    """Recomputes the gradients of existing ids into new rows (text may change)."""
    pairs = validate_documents(docs)
    self.refresh()
    unknown = [i for i, _ in pairs if i not in self._rows.latest]
    if unknown:
      raise KeyError(f"ids not in the bank (use append): {unknown[:10]}")
    return self._run(pairs, computer, force=True, **kw)

  def delete(self, ids) -> None:
    """Removes ids from the index: their rows are tombstoned, arrays untouched."""
    if isinstance(ids, str) or any(not isinstance(i, str) for i in ids):
      raise TypeError("delete expects a list of str ids")
    with self._chief_lock():
      if parallel.is_chief():
        self.refresh()
        self._rows.delete(ids)
        self._commit_manifest()
      _barrier(f"bank-delete:{self.path}")
      self.refresh()

  def transcode(self, path, codec, *, batch_rows: int = 64,
                rows_per_chunk: int = 1) -> "Bank":
    """Copies the live rows into a new bank at `path`, stored with `codec`.

    Re-encodes exactly what `gather` returns, so transcoding an fp32 bank equals
    building with `codec` directly. Deleted and superseded rows are dropped, so
    this also compacts a bank. Single process.
    """
    ids = self.ids
    src_rows = self.rows_of(ids)
    dst = Bank.create(path, identity=self.identity, codec=codec,
                      lora_config=self.lora_config, leaf_shapes=self.leaf_shapes,
                      rows_per_chunk=rows_per_chunk)
    encode = jax.jit(lambda flat: {k: codec.encode(v) for k, v in flat.items()})
    with store.writer_lock(dst.path):
      dst._append_rows(ids, [self._rows.text_sha(r) for r in src_rows])
      cut = {i for i, r in enumerate(src_rows) if int(r) in self._rows.truncated}
      for start in range(0, len(ids), batch_rows):
        rows = np.arange(start, min(start + batch_rows, len(ids)))
        parts = jax.device_get(encode(self.read_rows(src_rows[rows])))
        futures, sums = dst._issue_writes(rows, parts, np.arange(len(rows)))
        for f in futures:
          f.result()
        store.write_marker(dst.path / "commits", "transcode", rows, {},
                           [r for r in rows if r in cut], sums)
      dst.refresh()
      dst._commit_manifest()
    return dst

  def _run(self, docs, computer, *, force: bool, progress: bool = False,
           on_batch=None) -> BuildReport:
    """build / append / replace: reserve (chief), compute (all), fold (chief)."""
    start = time.perf_counter()
    self.check(identity=computer.identity, codec=computer.codec)
    if {k: tuple(v) for k, v in computer.leaf_shapes.items()} != self.leaf_shapes:
      raise BankMismatchError(f"gradient shapes {computer.leaf_shapes} differ from "
                              f"the bank's {self.leaf_shapes}")
    pairs = validate_documents(docs)
    report = BuildReport()
    with self._chief_lock():
      if parallel.is_chief():
        self.refresh()
        self._reserve(pairs, force, report)
      _barrier(f"bank-reserve:{self.path}")
      self.refresh()
      todo = self._rows.pending(pairs)
      mine = todo[parallel.process_slice(len(todo))]
      self._compute(mine, computer, report, progress, on_batch)
      _barrier(f"bank-computed:{self.path}")
      if parallel.is_chief():
        self.refresh()
        self._commit_manifest()
      _barrier(f"bank-folded:{self.path}")
      self.refresh()
    report.refused = self._rows.refused_ids([i for i, _ in pairs])
    report.seconds = time.perf_counter() - start
    return report

  def _reserve(self, pairs, force: bool, report: BuildReport) -> None:
    """Chief: a new pending row for every document that needs one."""
    plan = self._rows.plan([(i, compute.text_sha(t)) for i, t in pairs], force)
    report.skipped += plan.skipped
    report.appended += plan.appended
    report.replaced += plan.replaced
    if plan.ids:
      self._append_rows(plan.ids, plan.shas)

  def _append_rows(self, ids, shas) -> None:
    """Chief: reserves rows (arrays grown first, then the manifest written)."""
    n = self.num_rows + len(ids)
    for name, arr in self._arrays.items():
      self._arrays[name] = store.grow_array(arr, n)
    self._rows.append(ids, shas)
    self._commit_manifest(fold=False)

  def _compute(self, todo, computer, report, progress, on_batch) -> None:
    """Computes and commits (row, text) pairs batch by batch.

    Pipelined: batch i+1 is dispatched before batch i is fetched and written, and
    a batch's marker is written as soon as all its TensorStore writes committed.
    """
    rows = [r for r, _ in todo]
    tokenized = computer.tokenize([t for _, t in todo])
    truncated = {r for r, (_, _, cut) in zip(rows, tokenized) if cut}
    writer = f"p{jax.process_index()}"
    inflight, writing = collections.deque(), collections.deque()
    bar = tqdm.tqdm(total=len(todo), unit="doc", disable=not progress,
                    desc="bank", smoothing=0.1)

    def finish(max_pending: int):
      """Marks committed batches; waits while more than max_pending are in flight."""
      while writing and (len(writing) > max_pending
                         or all(f.done() for f in writing[0][2])):
        done, refused, futures, sums = writing.popleft()
        for f in futures:
          f.result()
        cut = [r for r in done + list(refused) if r in truncated]
        store.write_marker(self.path / "commits", writer, done, refused, cut, sums)
        report.computed += len(done)
        report.truncated += len(cut)
        bar.update(len(done) + len(refused))
        if on_batch is not None:
          on_batch(report)

    for batch_rows, tokens, mask in computer.batches(rows, tokenized):
      inflight.append((batch_rows, computer(tokens, mask)))
      if len(inflight) > 1:
        writing.append(self._fetch_and_write(*inflight.popleft()))
      finish(max_pending=2)
    while inflight:
      writing.append(self._fetch_and_write(*inflight.popleft()))
    finish(max_pending=0)
    bar.close()

  def _fetch_and_write(self, rows: np.ndarray, out):
    """One computed batch -> (committed rows, refused {row: why}, commit futures)."""
    parts, finite, loss = jax.device_get(out)
    n = len(rows)
    ok = np.asarray(finite)[:n]
    refused = {int(r): f"non-finite gradient (loss {float(l):.4g})"
               for r, l, good in zip(rows, np.asarray(loss)[:n], ok) if not good}
    for r, why in refused.items():
      logging.warning("bank %s: row %d refused: %s", self.path, r, why)
    keep = np.flatnonzero(ok)
    futures, sums = self._issue_writes(rows[keep], parts, keep) if keep.size else ([], {})
    return [int(r) for r in rows[keep]], refused, futures, sums

  def _issue_writes(self, rows: np.ndarray, parts: dict, select: np.ndarray
                    ) -> tuple[list, dict]:
    """Starts writing parts[leaf][part][select] to `rows`.

    Returns the commit futures and {row: row_checksum} of the bytes written (in
    the stored dtypes, as a read returns them).
    """
    flat = {f"{leaf}/{p}": np.asarray(x)[select].astype(
                self._arrays[f"{leaf}/{p}"].dtype.numpy_dtype, copy=False)
            for leaf, leaf_parts in parts.items() for p, x in leaf_parts.items()}
    futures = [self._arrays[name][rows].write(x).commit for name, x in flat.items()]
    sums = {int(r): store.row_checksum(self._rows.row_id(int(r)),
                                       {n: x[j] for n, x in flat.items()})
            for j, r in enumerate(rows)}
    return futures, sums

  def _commit_manifest(self, fold: bool = True) -> None:
    """Chief: writes the in-memory state as the manifest.

    With `fold`, rows superseded by a later complete row of their id are
    tombstoned, and the markers already merged into the state are deleted.
    """
    if fold:
      self._rows.fold()
    m = self._rows.to_manifest()
    store.write_json_atomic(self.path / MANIFEST, m)
    if fold:
      for p in self._markers:
        p.unlink(missing_ok=True)
    self.refresh()

  @contextlib.contextmanager
  def _chief_lock(self):
    if parallel.is_chief():
      with store.writer_lock(self.path, self.lock_timeout):
        yield
    else:
      yield
