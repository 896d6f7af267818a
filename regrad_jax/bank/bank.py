"""The Gradient Bank: one stored LoRA gradient per document, looked up by document id.

Rows and ids. Every document gradient lives in one row of the bank's arrays (see
store.py for the layout); rows are only ever appended, never rewritten once
complete. A row is *pending* (reserved, not yet committed), *complete*, *refused*
(its gradient was not finite) or *deleted* (tombstoned). The id index maps each id
to its latest complete, non-deleted row:

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
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from regrad_jax import fingerprint
from regrad_jax import parallel
from regrad_jax.bank import codecs
from regrad_jax.bank import compute
from regrad_jax.bank import store

FORMAT_VERSION = 2  # 2: row checksums and a manifest hash; 1 (no checks) still read.
MANIFEST = "manifest.json"
REPAIR = "python -m launch.check_kb --workdir=WORKDIR --config=CONFIG --repair"


class BankMismatchError(ValueError):
  """The bank was built from other weights, theta*, tokenizer, ... or codec."""


class BankDamagedError(ValueError):
  """Stored data does not match its checksum (or is missing)."""


# Threads that verify row checksums.
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))


def _manifest_sha(m: dict) -> str:
  return store.json_sha({k: v for k, v in m.items() if k != "sha256"})


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


def _to_ranges(flags: np.ndarray) -> list[list[int]]:
  """Bool (n,) -> [[start, stop), ...] runs of True."""
  padded = np.concatenate([[False], flags.astype(bool), [False]])
  edges = np.flatnonzero(padded[1:] != padded[:-1])
  return [[int(a), int(b)] for a, b in zip(edges[::2], edges[1::2])]


def _from_ranges(ranges, n: int) -> np.ndarray:
  flags = np.zeros((n,), bool)
  for a, b in ranges:
    flags[a:b] = True
  return flags


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
    self._pinned, self._pinned_sums = None, {}
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
    m = {
        "format_version": FORMAT_VERSION,
        "codec": codec.to_dict(),
        "identity": ident,
        "fingerprint": fingerprint.combine(**{k: str(v) for k, v in ident.items()}),
        "lora_config": _lora_dict(lora_config),
        "leaf_shapes": {k: list(v) for k, v in leaf_shapes.items()},
        "rows_per_chunk": int(rows_per_chunk),
        "ids": [], "sha": [], "complete": [], "deleted": [], "refused": {},
        "truncated": [], "checksums": {},
    }
    m["sha256"] = _manifest_sha(m)
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
    version = m.get("format_version") if isinstance(m, dict) else None
    if version not in (1, FORMAT_VERSION):
      raise ValueError(f"{self.path}: bank format {version} is not "
                       f"supported (expected {FORMAT_VERSION})")
    if version == FORMAT_VERSION and m.get("sha256") != _manifest_sha(m):
      raise BankDamagedError(
          f"{path} was altered (its content does not match its sha256): ids, rows or "
          "settings cannot be trusted; restore it, or move the bank away and rebuild "
          "with python -m launch.build_bank")
    markers = store.read_markers(marker_paths)
    n = len(m["ids"])
    complete = _from_ranges(m["complete"], n)
    refused = {int(r): why for r, why in m["refused"].items()}
    truncated = set(m["truncated"])
    checksums = {int(r): c for r, c in m.get("checksums", {}).items()}
    for _, mk in markers:  # Rows >= n belong to a newer manifest: ignored.
      complete[[r for r in mk["complete"] if r < n]] = True
      refused.update({int(r): why for r, why in mk["refused"].items() if int(r) < n})
      truncated.update(r for r in mk["truncated"] if r < n)
      checksums.update({int(r): c for r, c in mk.get("checksums", {}).items()
                        if int(r) < n})
    deleted = set(m["deleted"])
    by_id, latest, live = collections.defaultdict(list), {}, {}
    for row, doc_id in enumerate(m["ids"]):
      by_id[doc_id].append(row)
      if row in deleted:
        continue
      latest[doc_id] = row
      if complete[row] and row not in refused:
        live[doc_id] = row
    self._manifest, self._markers = m, [p for p, _ in markers]
    self._complete, self._refused = complete, refused
    self._truncated, self._deleted = truncated, deleted
    self._checksums = checksums
    self._by_id, self._latest, self._own_live = by_id, latest, live
    self._live = live if self._pinned is None else self._pinned
    self.codec = codecs.from_dict(m["codec"])
    self.identity = compute.Identity.from_dict(m["identity"])
    self.leaf_shapes = {k: tuple(v) for k, v in m["leaf_shapes"].items()}
    if n > self._array_rows:  # Reopen: rows were appended since.
      self._arrays = {f"{leaf}/{part}": store.open_array(self.path / "arrays" / leaf / part)
                      for leaf, shape in self.leaf_shapes.items()
                      for part in self.codec.parts(shape)}
      self._array_rows = n

  def pin(self, rows: dict[str, int], checksums: dict[int, str]) -> None:
    """Serves exactly `rows` {id: row} (a knowledge-base catalog's committed
    state), verified against `checksums` {row: checksum}, whatever later rows the
    manifest holds. BankDamagedError naming the ids whose row is not complete here."""
    bad = [i for i, r in rows.items() if not (0 <= r < self.num_rows) or not self._complete[r]]
    if bad:
      raise BankDamagedError(f"gradient bank {self.path} lacks the committed rows of "
                             f"{bad[:10]} (rows {[rows[i] for i in bad[:10]]})")
    self._pinned, self._pinned_sums = dict(rows), dict(checksums)
    self._live = self._pinned

  def unpin(self) -> None:
    """Serves the manifest's own latest rows again."""
    self._pinned, self._pinned_sums = None, {}
    self._live = self._own_live

  def committed(self, ids) -> dict[str, tuple[int, str | None]]:
    """{id: (row, checksum)} of the bank's own latest complete rows of `ids` (the
    manifest's view, whatever is pinned); ids without one are left out."""
    return {i: (r, self._checksums.get(r)) for i in ids
            if (r := self._own_live.get(i)) is not None}

  def is_truncated(self, row: int) -> bool:
    """Whether a row's gradient was taken on a text cut to max_len."""
    return int(row) in self._truncated

  def stored_checksums(self, rows) -> dict[int, str]:
    """{row: row_checksum} of the bytes stored now (rows with a recorded checksum
    are verified by the read; format-1 rows, which have none, are hashed)."""
    rows = np.unique(np.asarray(rows, np.int64))
    raw = self._read_raw(rows) if len(rows) else {}
    return {int(r): store.row_checksum(self._manifest["ids"][r], {n: x[j] for n, x in raw.items()})
            for j, r in enumerate(rows)}

  def row_text_sha(self, row: int) -> str:
    """The text hash a row was computed from (compute.text_sha)."""
    return self._manifest["sha"][row]

  @property
  def ids(self) -> list[str]:
    """Ids with a complete gradient, in row order."""
    return sorted(self._live, key=self._live.get)

  def __len__(self) -> int:
    return len(self._live)

  def __contains__(self, doc_id) -> bool:
    return doc_id in self._live

  @property
  def num_rows(self) -> int:
    """Rows ever reserved (deleted and pending ones included)."""
    return len(self._manifest["ids"])

  @property
  def fingerprint(self) -> str:
    """One hash of the identity (the parts are in `identity`)."""
    return self._manifest["fingerprint"]

  def _lora_config_obj(self):
    from regrad_jax.model.lora import LoraConfig  # pylint: disable=g-import-not-at-top
    d = self._manifest["lora_config"]
    return LoraConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

  @property
  def lora_config(self) -> dict:
    """A copy of the LoRA config fields stored in the manifest (JSON dict)."""
    return dict(self._manifest["lora_config"])

  @property
  def refused(self) -> dict[str, str]:
    """{id: reason} for ids whose latest row was refused."""
    return {i: self._refused[r] for i, r in self._latest.items() if r in self._refused}

  @property
  def num_truncated(self) -> int:
    """Live documents whose gradient was taken on a truncated text."""
    return sum(1 for r in self._live.values() if r in self._truncated)

  def rows_of(self, ids) -> np.ndarray:
    """Live rows of `ids`; KeyError naming the ids without a complete gradient."""
    missing = [i for i in ids if i not in self._live]
    if missing:
      more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
      raise KeyError(f"no gradient in bank {self.path} for ids {missing[:10]}{more}")
    return np.array([self._live[i] for i in ids], np.int64)

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

    def ok(j_r):
      j, r = j_r
      want = self._pinned_sums.get(r) if self._pinned is not None else None
      want = want or self._checksums.get(r)
      if want is None:  # A format-1 bank: rows carry no checksum.
        return True
      return store.row_checksum(self._manifest["ids"][r],
                                {n: x[j] for n, x in raw.items()}) == want
    rows = rows.tolist()
    bad = [r for r, good in zip(rows, _POOL.map(ok, enumerate(rows))) if not good]
    if bad:
      raise BankDamagedError(f"gradient bank {self.path}: rows {bad[:10]} (ids "
                             f"{[self._manifest['ids'][r] for r in bad[:10]]}) do not match "
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
    present = [i for i, _ in pairs if i in self._live]
    if present:
      raise ValueError(f"ids already in the bank (use replace): {present[:10]}")
    return self._run(pairs, computer, force=False, **kw)

  def replace(self, docs, computer: compute.GradientComputer, **kw) -> BuildReport:
    """Recomputes the gradients of existing ids into new rows (text may change)."""
    pairs = validate_documents(docs)
    self.refresh()
    unknown = [i for i, _ in pairs if i not in self._latest]
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
        unknown = [i for i in ids if i not in self._latest]
        if unknown:
          raise KeyError(f"ids not in the bank: {unknown[:10]}")
        for doc_id in ids:
          self._deleted.update(self._by_id[doc_id])
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
      dst._append_rows(ids, [self._manifest["sha"][r] for r in src_rows])
      cut = {i for i, r in enumerate(src_rows) if int(r) in self._truncated}
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
      todo = [(self._latest[i], t) for i, t in pairs
              if not self._complete[self._latest[i]]
              and self._latest[i] not in self._refused]
      mine = todo[parallel.process_slice(len(todo))]
      self._compute(mine, computer, report, progress, on_batch)
      _barrier(f"bank-computed:{self.path}")
      if parallel.is_chief():
        self.refresh()
        self._commit_manifest()
      _barrier(f"bank-folded:{self.path}")
      self.refresh()
    report.refused = {i: self._refused[self._latest[i]] for i, _ in pairs
                      if self._latest.get(i) in self._refused}
    report.seconds = time.perf_counter() - start
    return report

  def _reserve(self, pairs, force: bool, report: BuildReport) -> None:
    """Chief: a new pending row for every document that needs one."""
    new_ids, new_shas = [], []
    for doc_id, text in pairs:
      sha = compute.text_sha(text)
      row = self._latest.get(doc_id)
      if row is not None and self._manifest["sha"][row] == sha:
        pending = not self._complete[row] and row not in self._refused
        if pending:  # An interrupted run's reservation: computed again below.
          continue
        if not force:
          report.skipped += 1
          continue
      new_ids.append(doc_id)
      new_shas.append(sha)
      if doc_id in self._live:
        report.replaced += 1
      else:
        report.appended += 1
    if new_ids:
      self._append_rows(new_ids, new_shas)

  def _append_rows(self, ids, shas) -> None:
    """Chief: reserves rows (arrays grown first, then the manifest written)."""
    n = self.num_rows + len(ids)
    for name, arr in self._arrays.items():
      self._arrays[name] = store.grow_array(arr, n)
    self._manifest["ids"] += list(ids)
    self._manifest["sha"] += list(shas)
    self._complete = np.concatenate([self._complete, np.zeros((len(ids),), bool)])
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
    sums = {int(r): store.row_checksum(self._manifest["ids"][int(r)],
                                       {n: x[j] for n, x in flat.items()})
            for j, r in enumerate(rows)}
    return futures, sums

  def _commit_manifest(self, fold: bool = True) -> None:
    """Chief: writes the in-memory state as the manifest.

    With `fold`, rows superseded by a later complete row of their id are
    tombstoned, and the markers already merged into the state are deleted.
    """
    m = self._manifest
    if fold:
      for doc_id, row in self._own_live.items():
        self._deleted.update(r for r in self._by_id[doc_id] if r < row)
    m["complete"] = _to_ranges(self._complete)
    m["refused"] = {str(r): why for r, why in sorted(self._refused.items())}
    m["truncated"] = sorted(int(r) for r in self._truncated)
    m["deleted"] = sorted(int(r) for r in self._deleted)
    m["checksums"] = {str(r): c for r, c in sorted(self._checksums.items())}
    m["format_version"] = FORMAT_VERSION  # A format-1 bank is upgraded by a write.
    m["sha256"] = _manifest_sha(m)
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
