"""The rows of a Gradient Bank: what state each row is in and which row serves an id.

Pure Python and NumPy: nothing here reads or writes arrays or files, so the
bookkeeping that build / append / replace / delete rely on is tested alone
(tests/test_rows.py); bank.py does the I/O around it.

Every document gradient lives in one row; rows are only ever appended. A row is

  pending    reserved (its id and text sha recorded), no gradient committed yet;
  complete   its gradient is committed (the manifest or a commit marker says so);
  refused    its gradient was not finite: nothing stored, the reason recorded;
  deleted    tombstoned: by `delete`, or superseded by a later complete row of its
             id (`fold`). A complete or refused row can also be deleted.

The id index, rebuilt from the rows whenever a table is made:

  latest[id]    the id's newest row that is not deleted, in any state: the row a
                build resumes, or the text a replace supersedes;
  own_live[id]  the same row if it is complete and not refused: the row `gather`
                serves (`live`, unless a knowledge base pinned other rows).

Copy-on-write: replacing an id reserves a new row, so `latest` moves at once while
`live` stays on the old row until the new one completes; folding then tombstones
the old row (arrays are never rewritten).

The manifest is this state as one JSON dict, beside the bank's settings (codec,
identity, LoRA config, leaf shapes, chunking), which a table carries untouched:

  ids, sha     (N,) lists: each row's document id and compute.text_sha
  complete     [[start, stop), ...] runs of complete rows
  refused      {"row": reason}
  truncated    rows whose text was cut to max_len
  deleted      tombstoned rows
  checksums    {"row": store.row_checksum} of complete rows
  sha256       of all the other fields (format 2): a valid-JSON edit is refused

Commit markers (store.write_marker) add complete / refused / truncated / checksums
for rows the manifest does not list yet; a table merges them, and `to_manifest`
writes the merged state back (the chief's fold).
"""
import collections
import dataclasses
import pathlib

import numpy as np

from regrad_jax.bank import store

FORMAT_VERSION = 2  # 2: row checksums and a manifest hash; 1 (no checks) still read.
MANIFEST = "manifest.json"


class BankDamagedError(ValueError):
  """Stored data does not match its checksum (or is missing)."""


def manifest_sha(m: dict) -> str:
  """sha256 of a manifest's canonical JSON, its own "sha256" field left out."""
  return store.json_sha({k: v for k, v in m.items() if k != "sha256"})


def to_ranges(flags: np.ndarray) -> list[list[int]]:
  """Bool (n,) -> [[start, stop), ...] runs of True."""
  padded = np.concatenate([[False], flags.astype(bool), [False]])
  edges = np.flatnonzero(padded[1:] != padded[:-1])
  return [[int(a), int(b)] for a, b in zip(edges[::2], edges[1::2])]


def from_ranges(ranges, n: int) -> np.ndarray:
  """[[start, stop), ...] -> bool (n,), True inside the runs."""
  flags = np.zeros((n,), bool)
  for a, b in ranges:
    flags[a:b] = True
  return flags


def new_manifest(settings: dict) -> dict:
  """The manifest of a bank with no rows: `settings` (codec, identity, ...) in
  order, the empty row fields and its sha256."""
  m = {"format_version": FORMAT_VERSION, **settings,
       "ids": [], "sha": [], "complete": [], "deleted": [], "refused": {},
       "truncated": [], "checksums": {}}
  m["sha256"] = manifest_sha(m)
  return m


@dataclasses.dataclass
class Plan:
  """What a build must reserve (`RowTable.plan`).

  Attributes:
    ids, shas: documents that get a new row, with their text shas, in call order.
    skipped: documents whose complete (or refused) row has the same text.
    appended: new ids among `ids` (not live now).
    replaced: live ids among `ids` (the new row will supersede the live one).
  """
  ids: list[str] = dataclasses.field(default_factory=list)
  shas: list[str] = dataclasses.field(default_factory=list)
  skipped: int = 0
  appended: int = 0
  replaced: int = 0


class RowTable:
  """The row state of a manifest plus its commit markers, and the id index.

  Attributes:
    manifest: the manifest dict (settings included), as loaded; `to_manifest`
      writes the row state back into it.
    complete: (N,) bool, complete rows.
    refused: {row: reason}.
    truncated: set of rows whose text was cut to max_len.
    deleted: set of tombstoned rows.
    checksums: {row: row_checksum} recorded at commit.
    by_id: {id: [rows, ascending]}, every row the id ever had.
    latest: {id: row} newest non-deleted row (module docstring).
    own_live: {id: row} the manifest's own servable rows.
  """

  def __init__(self, manifest: dict, markers=(), *, bank="bank",
               pinned: tuple[dict, dict] | None = None):
    """Checks a manifest and merges commit markers into its row state.

    Args:
      manifest: the parsed manifest.json.
      markers: parsed commit markers; rows >= N (of a newer manifest) are ignored.
      bank: the bank's folder, named in errors.
      pinned: (rows, checksums) of an earlier `pin`, kept as they are.
    Raises:
      ValueError: a format this code does not read.
      BankDamagedError: a format-2 manifest whose content does not match its sha256.
    """
    m = manifest
    version = m.get("format_version") if isinstance(m, dict) else None
    if version not in (1, FORMAT_VERSION):
      raise ValueError(f"{bank}: bank format {version} is not "
                       f"supported (expected {FORMAT_VERSION})")
    if version == FORMAT_VERSION and m.get("sha256") != manifest_sha(m):
      raise BankDamagedError(
          f"{pathlib.Path(bank) / MANIFEST} was altered (its content does not match "
          "its sha256): ids, rows or settings cannot be trusted; restore it, or move "
          "the bank away and rebuild with python -m launch.build_bank")
    self.manifest, self._bank = m, bank
    n = len(m["ids"])
    self.complete = from_ranges(m["complete"], n)
    self.refused = {int(r): why for r, why in m["refused"].items()}
    self.truncated = set(m["truncated"])
    self.checksums = {int(r): c for r, c in m.get("checksums", {}).items()}
    for mk in markers:
      self.complete[[r for r in mk["complete"] if r < n]] = True
      self.refused.update({int(r): why for r, why in mk["refused"].items() if int(r) < n})
      self.truncated.update(r for r in mk["truncated"] if r < n)
      self.checksums.update({int(r): c for r, c in mk.get("checksums", {}).items()
                             if int(r) < n})
    self.deleted = set(m["deleted"])
    self.by_id, self.latest, self.own_live = collections.defaultdict(list), {}, {}
    for row, doc_id in enumerate(m["ids"]):
      self.by_id[doc_id].append(row)
      if row in self.deleted:
        continue
      self.latest[doc_id] = row
      if self.complete[row] and row not in self.refused:
        self.own_live[doc_id] = row
    self.pinned = pinned

  # --- Queries --------------------------------------------------------------------

  @property
  def num_rows(self) -> int:
    """Rows ever reserved (deleted and pending ones included)."""
    return len(self.manifest["ids"])

  @property
  def live(self) -> dict[str, int]:
    """{id: row} served: the pinned rows, else `own_live`."""
    return self.own_live if self.pinned is None else self.pinned[0]

  def row_id(self, row: int) -> str:
    return self.manifest["ids"][row]

  def text_sha(self, row: int) -> str:
    return self.manifest["sha"][row]

  def expected_checksum(self, row: int) -> str | None:
    """The checksum a read of `row` must match (the pinned one first); None for
    a format-1 row, which has none."""
    want = self.pinned[1].get(row) if self.pinned is not None else None
    return want or self.checksums.get(row)

  def pending(self, pairs) -> list[tuple[int, str]]:
    """(row, text) of the (id, text) pairs whose latest row awaits a gradient
    (all ids must have a row: call after `plan` / `append`)."""
    return [(self.latest[i], t) for i, t in pairs
            if not self.complete[self.latest[i]] and self.latest[i] not in self.refused]

  def refused_ids(self, ids=None) -> dict[str, str]:
    """{id: reason} of `ids` (None: all) whose latest row was refused."""
    ids = self.latest if ids is None else ids
    return {i: self.refused[self.latest[i]] for i in ids
            if self.latest.get(i) in self.refused}

  def committed(self, ids) -> dict[str, tuple[int, str | None]]:
    """{id: (row, checksum)} of the own latest complete rows of `ids` (whatever
    is pinned); ids without one are left out."""
    return {i: (r, self.checksums.get(r)) for i in ids
            if (r := self.own_live.get(i)) is not None}

  # --- Changes (the chief's, before it writes `to_manifest`) ----------------------

  def plan(self, docs, force: bool) -> Plan:
    """Which documents need a new row.

    Args:
      docs: (id, text sha) pairs (compute.text_sha).
      force: give a new row even to an unchanged text (replace).
    Same id and text: skipped if its row is complete or refused (unless `force`),
    left to resume if pending. A new id or a changed text: a new row.
    """
    out = Plan()
    for doc_id, sha in docs:
      row = self.latest.get(doc_id)
      if row is not None and self.text_sha(row) == sha:
        if not self.complete[row] and row not in self.refused:
          continue  # An interrupted run's reservation: computed again.
        if not force:
          out.skipped += 1
          continue
      out.ids.append(doc_id)
      out.shas.append(sha)
      if doc_id in self.live:
        out.replaced += 1
      else:
        out.appended += 1
    return out

  def append(self, ids, shas) -> None:
    """Reserves pending rows N, N+1, ... for `ids` (they become their `latest`)."""
    start = self.num_rows
    self.manifest["ids"] += list(ids)
    self.manifest["sha"] += list(shas)
    self.complete = np.concatenate([self.complete, np.zeros((len(ids),), bool)])
    for row, doc_id in enumerate(ids, start):
      self.by_id[doc_id].append(row)
      self.latest[doc_id] = row

  def delete(self, ids) -> None:
    """Tombstones every row of `ids`; KeyError naming ids without a row."""
    unknown = [i for i in ids if i not in self.latest]
    if unknown:
      raise KeyError(f"ids not in the bank: {unknown[:10]}")
    for doc_id in ids:
      self.deleted.update(self.by_id[doc_id])
      self.latest.pop(doc_id, None)
      self.own_live.pop(doc_id, None)

  def fold(self) -> None:
    """Tombstones the rows each live row superseded (older rows of its id)."""
    for doc_id, row in self.own_live.items():
      self.deleted.update(r for r in self.by_id[doc_id] if r < row)

  def pin(self, rows: dict[str, int], checksums: dict[int, str]) -> None:
    """Serves exactly `rows` {id: row}, read against `checksums` {row: checksum};
    BankDamagedError naming the ids whose row is not complete here."""
    bad = [i for i, r in rows.items() if not (0 <= r < self.num_rows) or not self.complete[r]]
    if bad:
      raise BankDamagedError(f"gradient bank {self._bank} lacks the committed rows of "
                             f"{bad[:10]} (rows {[rows[i] for i in bad[:10]]})")
    self.pinned = (dict(rows), dict(checksums))

  def unpin(self) -> None:
    self.pinned = None

  def to_manifest(self) -> dict:
    """Writes the row state into the manifest dict (marker rows merged, format
    upgraded to FORMAT_VERSION, sha256 renewed) and returns it."""
    m = self.manifest
    m["complete"] = to_ranges(self.complete)
    m["refused"] = {str(r): why for r, why in sorted(self.refused.items())}
    m["truncated"] = sorted(int(r) for r in self.truncated)
    m["deleted"] = sorted(int(r) for r in self.deleted)
    m["checksums"] = {str(r): c for r, c in sorted(self.checksums.items())}
    m["format_version"] = FORMAT_VERSION  # A format-1 bank is upgraded by a write.
    m["sha256"] = manifest_sha(m)
    return m
