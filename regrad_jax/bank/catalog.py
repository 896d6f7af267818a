"""The knowledge-base catalog: what is committed, in one SQLite file (stdlib sqlite3).

  WORKDIR/kb.sqlite
    meta       key -> value: format_version, generation (+1 per commit), the bank's
               fingerprint, the chunking settings, catalog_sha
    documents  id, text, sha, passages, record    one row per committed document
    passages   id, doc_id, part, text, sha, row, checksum, truncated, record
               one per banked passage: its bank row and that row's checksum

A document is in the knowledge base exactly when the catalog says so; bank rows
the catalog does not name (an interrupted inject's) are never served, and the
index is checked against the catalog when loaded.

Commit. `commit` copies the file, applies the whole change in the copy, fsyncs it
and renames it over kb.sqlite (then fsyncs the folder): a SIGKILL at any point
leaves the old or the new catalog, never a mix. NB: not SQLite's WAL or rollback
journal in place: a reader would then need to create -wal/-shm files (WAL), or
could not open a catalog with a hot journal read-only (rollback), and read paths
here never create anything. Readers open the file read-only and immutable; a file
is never changed once renamed into place, so a reader sees one generation.

Integrity. Each document and passage row carries `record`, a sha256 of its fields
(ids, text hash, bank row, row checksum); catalog_sha hashes all records with the
generation, fingerprint and settings. `open` verifies every text against its hash,
every record and catalog_sha: a changed id, row, checksum or text is a
CatalogDamagedError naming the file and the ids.
"""
import collections
import dataclasses
import json
import os
import pathlib
import shutil
import sqlite3
import uuid

from regrad_jax.bank import store

FORMAT_VERSION = 1
FILE = "kb.sqlite"

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE documents (id TEXT PRIMARY KEY, text TEXT NOT NULL, sha TEXT NOT NULL,
                        passages INTEGER NOT NULL, record TEXT NOT NULL);
CREATE TABLE passages (id TEXT PRIMARY KEY, doc_id TEXT NOT NULL, part INTEGER NOT NULL,
                       text TEXT NOT NULL, sha TEXT NOT NULL, row INTEGER NOT NULL,
                       checksum TEXT NOT NULL, truncated INTEGER NOT NULL,
                       record TEXT NOT NULL);
"""


class CatalogDamagedError(ValueError):
  """The catalog file is missing a part, unreadable, or does not match its hashes."""


@dataclasses.dataclass(frozen=True)
class Passage:
  """One banked passage of a document (the whole document when it fits).

  Attributes:
    id: the bank and index key: the document id, or "<doc id>#<part>" for a
      document split into several passages.
    doc_id, part: the document and the passage's position in it.
    text, sha: the passage text and its compute.text_sha.
    row, checksum: its bank row and that row's store.row_checksum.
    truncated: whether the gradient was taken on a cut text (truncate mode).
  """
  id: str
  doc_id: str
  part: int
  text: str
  sha: str
  row: int = -1
  checksum: str = ""
  truncated: bool = False

  def record(self) -> str:
    return store.json_sha(["p", self.id, self.doc_id, self.part, self.sha, self.row,
                           self.checksum, bool(self.truncated)])


def _doc_record(doc_id: str, sha: str, passages: int) -> str:
  return store.json_sha(["d", doc_id, sha, int(passages)])


def _text_sha(text: str) -> str:
  from regrad_jax.bank import compute  # pylint: disable=g-import-not-at-top
  return compute.text_sha(text)


class Catalog:
  """A read-only snapshot of kb.sqlite, verified when opened.

  Attributes:
    path: the catalog file.
    generation: commits so far (0: created, empty).
    bank_fingerprint: the bank identity's fingerprint it was created for.
    settings: {"long_documents", "max_len", "overlap"} the chunking at creation.
    documents: {id: text}, in commit order.
    passages: [Passage], in commit order.
  """

  def __init__(self, path):
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"no knowledge-base catalog at {self.path}")
    try:
      uri = self.path.absolute().as_uri() + "?mode=ro&immutable=1"
      con = sqlite3.connect(uri, uri=True)
      try:
        meta = dict(con.execute("SELECT key, value FROM meta"))
        docs = con.execute("SELECT id, text, sha, passages, record FROM documents "
                           "ORDER BY rowid").fetchall()
        rows = con.execute("SELECT id, doc_id, part, text, sha, row, checksum, truncated,"
                           " record FROM passages ORDER BY rowid").fetchall()
      finally:
        con.close()
    except sqlite3.Error as e:
      raise CatalogDamagedError(f"{self.path} cannot be read as a catalog ({e}); "
                                f"{_HELP}") from e
    if meta.get("format_version") != str(FORMAT_VERSION):
      raise CatalogDamagedError(f"{self.path}: catalog format {meta.get('format_version')}"
                                f" is not supported (expected {FORMAT_VERSION}); {_HELP}")
    self._meta = meta
    self.generation = int(meta["generation"])
    self.bank_fingerprint = meta["bank_fingerprint"]
    self.settings = json.loads(meta["settings"])
    self.documents = {d[0]: d[1] for d in docs}
    self.passages = [Passage(i, d, int(p), t, s, int(r), c, bool(tr))
                     for i, d, p, t, s, r, c, tr, _ in rows]
    self._verify(docs, rows)

  def _verify(self, docs, rows) -> None:
    bad = [d[0] for d in docs if _text_sha(d[1]) != d[2] or _doc_record(d[0], d[2], d[3]) != d[4]]
    bad += [p.id for p, r in zip(self.passages, rows) if _text_sha(p.text) != p.sha
            or p.record() != r[-1]]
    counts = collections.Counter(p.doc_id for p in self.passages)
    bad += [d[0] for d in docs if counts[d[0]] != d[3]]
    bad += [p.id for p in self.passages if p.doc_id not in self.documents]
    if bad:
      raise CatalogDamagedError(f"{self.path} was altered: the records of {sorted(set(bad))[:10]}"
                                f" do not match their hashes; {_HELP}")
    if self._meta.get("catalog_sha") != self.content_sha():
      raise CatalogDamagedError(f"{self.path} was altered: its content does not match "
                                f"catalog_sha; {_HELP}")

  def content_sha(self) -> str:
    """The hash of everything committed (what catalog_sha must equal)."""
    counts = collections.Counter(p.doc_id for p in self.passages)
    return _content_sha(self.generation, self.bank_fingerprint, self.settings,
                        [_doc_record(i, _text_sha(t), counts[i])
                         for i, t in self.documents.items()],
                        [p.record() for p in self.passages])

  @property
  def catalog_sha(self) -> str:
    return self._meta["catalog_sha"]

  def passages_of(self, doc_ids) -> list[Passage]:
    """The passages of these documents, in commit order."""
    want = set(doc_ids)
    return [p for p in self.passages if p.doc_id in want]

  # --- Writing (callers hold the knowledge base's writer lock) ------------------

  @classmethod
  def create(cls, path, *, bank_fingerprint: str, settings: dict) -> "Catalog":
    """Writes an empty catalog (generation 0); FileExistsError if one exists."""
    path = pathlib.Path(path)
    if path.exists():
      raise FileExistsError(f"a knowledge-base catalog already exists at {path}")
    meta = {"format_version": str(FORMAT_VERSION), "generation": "0",
            "bank_fingerprint": bank_fingerprint,
            "settings": json.dumps(settings, sort_keys=True)}
    meta["catalog_sha"] = _content_sha(0, bank_fingerprint, settings, [], [])

    def write(con):
      con.executescript(_SCHEMA)
      con.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
    _write_new(path, None, write)
    return cls(path)

  def commit(self, add: list[tuple[str, str, list[Passage]]], remove=()) -> "Catalog":
    """Commits one change as generation + 1; returns the new snapshot.

    Args:
      add: (doc id, text, its passages with rows and checksums); a document
        already there is replaced (its old passages dropped).
      remove: document ids to drop (with their passages).
    """
    docs = dict(self.documents)
    passages = {p.id: p for p in self.passages}
    gone = set(remove) | {d for d, _, _ in add}
    for doc_id in gone:
      docs.pop(doc_id, None)
    passages = {i: p for i, p in passages.items() if p.doc_id not in gone}
    for doc_id, text, parts in add:
      docs[doc_id] = text
      passages.update({p.id: p for p in parts})
    generation = self.generation + 1
    counts = collections.Counter(p.doc_id for p in passages.values())
    doc_rows = [(i, t, _text_sha(t), counts[i]) for i, t in docs.items()]
    doc_rows = [(*d, _doc_record(d[0], d[2], d[3])) for d in doc_rows]
    sha = _content_sha(generation, self.bank_fingerprint, self.settings,
                       [d[-1] for d in doc_rows], [p.record() for p in passages.values()])

    def write(con):
      removed = [(d,) for d in gone]
      con.executemany("DELETE FROM passages WHERE doc_id = ?", removed)
      con.executemany("DELETE FROM documents WHERE id = ?", removed)
      added = {a[0] for a in add}
      con.executemany("INSERT INTO documents VALUES (?, ?, ?, ?, ?)",
                      [d for d in doc_rows if d[0] in added])
      con.executemany("INSERT INTO passages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      [(p.id, p.doc_id, p.part, p.text, p.sha, p.row, p.checksum,
                        int(p.truncated), p.record()) for _, _, ps in add for p in ps])
      con.executemany("UPDATE meta SET value = ? WHERE key = ?",
                      [(str(generation), "generation"), (sha, "catalog_sha")])
    _write_new(self.path, self.path, write)
    return Catalog(self.path)


_HELP = ("restore it from a backup, or rebuild the knowledge base (move the workdir's "
         "bank/ and kb.sqlite away, then python -m launch.build_bank)")


def _content_sha(generation, fingerprint, settings, doc_records, passage_records) -> str:
  return store.json_sha({"generation": int(generation), "bank": fingerprint,
                         "settings": settings, "documents": sorted(doc_records),
                         "passages": sorted(passage_records)})


def _write_new(path: pathlib.Path, source, write) -> None:
  """Writes a catalog beside `path` (a copy of `source`, changed by `write(con)`),
  fsyncs it and renames it over `path`: the commit point."""
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
  for old in path.parent.glob(f".{path.name}.*.tmp"):  # An interrupted commit's.
    old.unlink(missing_ok=True)
  if source is not None:
    shutil.copyfile(source, tmp)
  con = sqlite3.connect(tmp, isolation_level=None)
  try:
    con.execute("PRAGMA journal_mode=OFF")  # A crash loses only the copy.
    con.execute("BEGIN")
    write(con)  # (executescript, in `create`, commits by itself.)
    if con.in_transaction:
      con.execute("COMMIT")
  finally:
    con.close()
  fd = os.open(tmp, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
  os.replace(tmp, path)
  store.fsync_dir(path.parent)
