"""The knowledge base: bank rows, index entries and document texts that change together.

  kb = KnowledgeBase.open(workdir)              # read only: verified, creates nothing
  kb = KnowledgeBase.open_for(workdir, computer)   # a writer: creates when absent
  kb.add(documents, computer, chunking)         # launch.build_bank, ReGrad.inject
  kb.remove(ids)                                 # ReGrad.remove
  retriever = kb.retriever(config)               # the saved index, in line with the catalog
  report = check(workdir)                        # launch.check_kb

Layout of a workdir (see README, "Knowledge base"):
  bank/       the Gradient Bank: gradient rows in TensorStore (bank/store.py)
  kb.sqlite   the catalog (bank/catalog.py): committed documents, their passages
              and texts, each passage's bank row and row checksum, a generation
  index/      the retrieval index of exactly the catalog's passages, stamped with
              the catalog generation and hash it was saved for
  kb.lock     flock'ed by the one process changing the knowledge base

One commit point. A change validates everything first (types, ids, encodable
non-empty texts, duplicates, ids present or absent), then computes the bank rows
(append-only: nothing committed is overwritten), then commits the catalog (one
atomic rename), then saves the index. The catalog alone says what is in the
knowledge base: rows it does not name are never served (an interrupted inject
leaves only such rows, reused by the next try), and an index saved for another
catalog generation (a kill during the index save) is brought in line with the
catalog when loaded, in memory. So a reload after any crash sees exactly the last
committed state.

Long documents. With chunking (config.data.long_documents = "chunk", the
default), a document whose passage does not fit in max_len tokens is split into
overlapping passages "<id>#0", "<id>#1", ... (config.data.chunk_overlap tokens
shared by neighbours), each banked and indexed; answers map retrieved passages back
to their document. "truncate" keeps one passage cut to max_len (the bank records
it as truncated).
"""
import dataclasses
import pathlib
import re

from absl import logging

from regrad_jax import parallel
from regrad_jax import prompts
from regrad_jax.bank import bank as bank_lib
from regrad_jax.bank import catalog as catalog_lib
from regrad_jax.bank import store

CATALOG = catalog_lib.FILE
LOCK = "kb.lock"
BUILD = "python -m launch.build_bank --config=CONFIG --workdir={w}"


@dataclasses.dataclass(frozen=True)
class Chunking:
  """How documents longer than max_len tokens are stored.

  Attributes:
    mode: "chunk" (overlapping passages) or "truncate" (the first max_len tokens).
    max_len: tokens of one passage as banked (the gradient computer's max_len).
    overlap: tokens consecutive passages share (chunk mode).
  """
  mode: str = "chunk"
  max_len: int = 128
  overlap: int = 16

  def __post_init__(self):
    if self.mode not in ("chunk", "truncate"):
      raise ValueError(f"long_documents must be 'chunk' or 'truncate', got {self.mode!r}")
    if self.mode == "chunk" and not 0 <= self.overlap < self.max_len // 2:
      raise ValueError(f"chunk_overlap={self.overlap} must be in [0, max_len / 2 = "
                       f"{self.max_len // 2})")

  @classmethod
  def from_config(cls, config, mode: str | None = None) -> "Chunking":
    """config.data's chunking (mode: overrides data.long_documents), passages of
    the banked length (bank.max_context_len, else data.max_context_len)."""
    d = config.data
    max_len = config.bank.get("max_context_len", 0) or d.max_context_len
    return cls(mode=mode or d.get("long_documents", "chunk"), max_len=int(max_len),
               overlap=int(d.get("chunk_overlap", 16)))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def split_document(tokenizer, doc_id: str, text: str, chunking: Chunking
                   ) -> list[tuple[str, str]]:
  """(passage id, passage text) pairs of one document.

  A document that fits (or any document in truncate mode) is one passage with the
  document's id. Otherwise words are packed greedily into passages whose banked
  encoding (prompts.encode_document) fits max_len tokens, each next passage
  starting `overlap` tokens (whole words) before the previous one ended; a word
  longer than a passage is cut by characters.
  """
  _, cut = prompts.encode_document(tokenizer, text, chunking.max_len)
  if not cut or chunking.mode == "truncate":
    return [(doc_id, text)]
  fits = lambda t: not prompts.encode_document(tokenizer, t, chunking.max_len)[1]
  budget = chunking.max_len - len(prompts.encode_document(tokenizer, "", chunking.max_len)[0])
  words = []
  for w in re.findall(r"\S+\s*", text):
    while not fits(w.strip()):  # A word longer than a passage: cut it.
      n = max(1, len(w) * budget // (2 * len(tokenizer.encode(w)) + 1))
      words.append(w[:n])
      w = w[n:]
    words.append(w)
  cost = [len(tokenizer.encode(w)) for w in words]
  passages, start = [], 0
  while start < len(words):
    end, used = start, 0
    while end < len(words) and used + cost[end] <= budget:
      used += cost[end]
      end += 1
    end = max(end, start + 1)
    while end > start + 1 and not fits("".join(words[start:end]).strip()):
      end -= 1  # Tokens merge across word boundaries: the estimate can be short.
    passages.append("".join(words[start:end]).strip())
    if end == len(words):
      break
    back, shared = end, 0
    while back > start + 1 and shared + cost[back - 1] <= chunking.overlap:
      back -= 1
      shared += cost[back]
    start = back
  return [(f"{doc_id}#{i}", p) for i, p in enumerate(passages)]


@dataclasses.dataclass
class Report:
  """What one add / remove did.

  Attributes:
    added, replaced, skipped, removed: documents.
    passages: passages committed now (one per short document).
    refused: {document id: reason} documents not committed (a passage's gradient
      was not finite).
    bank: the bank's BuildReport (None for remove).
  """
  added: int = 0
  replaced: int = 0
  skipped: int = 0
  removed: int = 0
  passages: int = 0
  refused: dict = dataclasses.field(default_factory=dict)
  bank: bank_lib.BuildReport | None = None


def _missing(workdir: pathlib.Path) -> Exception:
  bank_dir = workdir / "bank"
  if (bank_dir / bank_lib.MANIFEST).exists():
    return FileNotFoundError(
        f"{workdir} has a gradient bank but no knowledge-base catalog "
        f"({workdir / CATALOG}; banks built before the catalog existed have none): "
        f"run {BUILD.format(w=workdir)} to commit its documents (rows already "
        "computed are reused, not recomputed)")
  return FileNotFoundError(f"no knowledge base in {workdir} (missing {workdir / CATALOG}): "
                           f"run {BUILD.format(w=workdir)} first")


class KnowledgeBase:
  """A workdir's bank + catalog (+ index); see the module docstring.

  Attributes:
    workdir: the folder.
    catalog: the committed state (catalog.Catalog).
    bank: the Gradient Bank, pinned to the catalog's rows.
    lock_timeout: seconds a writer waits for another one (0: fails at once).
  """

  def __init__(self, workdir, catalog, bank, lock_timeout: float = 0.0):
    self.workdir = pathlib.Path(workdir)
    self.catalog, self.bank = catalog, bank
    self.lock_timeout = float(lock_timeout)
    bank.lock_timeout = self.lock_timeout
    self._attach()

  @classmethod
  def open(cls, workdir, *, lock_timeout: float = 0.0) -> "KnowledgeBase":
    """Opens a knowledge base read-only (creates and deletes nothing).

    Raises FileNotFoundError (nothing there; says what to run),
    CatalogDamagedError / BankDamagedError (damage, naming the file).
    """
    workdir = pathlib.Path(workdir)
    if not (workdir / CATALOG).exists():
      raise _missing(workdir)
    catalog = catalog_lib.Catalog(workdir / CATALOG)
    bank = bank_lib.Bank.open(workdir / "bank")
    return cls(workdir, catalog, bank, lock_timeout)

  @classmethod
  def open_for(cls, workdir, computer, *, rows_per_chunk: int = 1,
               chunking: Chunking | None = None, lock_timeout: float = 0.0
               ) -> "KnowledgeBase":
    """Opens the knowledge base for writing `computer`'s gradients, creating the
    bank and the catalog when absent (every process calls this; the chief creates)."""
    workdir = pathlib.Path(workdir)
    bank = bank_lib.Bank.open_for(workdir / "bank", computer, rows_per_chunk=rows_per_chunk)
    if parallel.is_chief() and not (workdir / CATALOG).exists():
      with store.writer_lock(workdir, lock_timeout, LOCK):
        if not (workdir / CATALOG).exists():
          catalog_lib.Catalog.create(workdir / CATALOG, bank_fingerprint=bank.fingerprint,
                                     settings=(chunking or Chunking()).to_dict())
    bank_lib._barrier(f"kb-open:{workdir}")  # pylint: disable=protected-access
    return cls(workdir, catalog_lib.Catalog(workdir / CATALOG), bank, lock_timeout)

  def _attach(self) -> None:
    """Checks the bank against the catalog and pins the catalog's rows."""
    cat, bank = self.catalog, self.bank
    if bank.fingerprint != cat.bank_fingerprint:
      raise bank_lib.BankMismatchError(
          f"{bank.path} is not the bank {cat.path} was committed for (fingerprint "
          f"{bank.fingerprint}, catalog {cat.bank_fingerprint})")
    bad = [p.id for p in cat.passages if not 0 <= p.row < bank.num_rows
           or bank.row_id(p.row) != p.id or bank.row_text_sha(p.row) != p.sha]
    if bad:
      raise catalog_lib.CatalogDamagedError(
          f"{cat.path} and {bank.path} disagree on the rows of {bad[:10]}; "
          f"{catalog_lib._HELP}")  # pylint: disable=protected-access
    bank.pin({p.id: p.row for p in cat.passages}, {p.row: p.checksum for p in cat.passages})

  # --- Reading -------------------------------------------------------------------

  @property
  def documents(self) -> dict[str, str]:
    """{document id: text} committed."""
    return dict(self.catalog.documents)

  @property
  def passages(self) -> list[catalog_lib.Passage]:
    return list(self.catalog.passages)

  def doc_of(self) -> dict[str, str]:
    """{passage id: document id}."""
    return {p.id: p.doc_id for p in self.catalog.passages}

  def texts(self) -> dict[str, str]:
    """Texts by passage id and by document id (ICL prompts, display)."""
    return {**self.catalog.documents, **{p.id: p.text for p in self.catalog.passages}}

  def retriever(self, config):
    """The saved index, brought in line with the catalog (in memory) when it was
    saved for another generation or is absent; None for an empty catalog.

    A damaged index (files not matching their hashes) is an error naming it.
    """
    from regrad_jax.retrieval import retriever as retriever_lib  # pylint: disable=g-import-not-at-top
    want = {p.id: p for p in self.catalog.passages}
    path = self.workdir / "index"
    r = retriever_lib.Retriever.load(path) if retriever_lib.saved(path) else None
    stamp = (r.stamp or {}) if r is not None else {}
    if r is not None and stamp.get("catalog_sha") == self.catalog.catalog_sha:
      if sorted(r.ids) != sorted(want):
        raise retriever_lib.IndexDamagedError(
            f"index {path} does not hold the catalog's passages; repair: "
            "python -m launch.build_index --config=CONFIG --workdir=WORKDIR")
      return r
    if not want:
      return None
    have = stamp.get("text_shas") if r is not None else None
    if have is None or sorted(have) != sorted(r.ids):
      logging.warning("index %s %s: indexing the %d committed passages in memory "
                      "(python -m launch.build_index saves it)", path,
                      "is absent" if r is None else "was not saved for this catalog",
                      len(want))
      return retriever_lib.Retriever.build(config, list(want.values()))
    logging.warning("index %s was saved for catalog generation %s, the catalog is at %d "
                    "(an interrupted write): brought in line in memory", path,
                    stamp.get("generation"), self.catalog.generation)
    return self.sync(r, have)

  def sync(self, retriever, have: dict[str, str]):
    """Updates `retriever` (holding passages {id: text sha} `have`) in place to
    hold exactly the catalog's passages; returns it."""
    want = {p.id: p for p in self.catalog.passages}
    stale = [i for i, s in have.items() if i not in want or want[i].sha != s]
    new = [p for i, p in want.items() if have.get(i) != p.sha]
    if stale:
      retriever.remove(stale)
    if new:
      retriever.add(new)
    return retriever

  def save_index(self, retriever) -> None:
    """Saves `retriever` as WORKDIR/index, stamped with this catalog (chief only)."""
    if retriever is None or not parallel.is_chief():
      return
    retriever.save(self.workdir / "index", stamp=self.stamp())

  def stamp(self) -> dict:
    """What an index saved now records of the catalog."""
    return {"generation": self.catalog.generation, "catalog_sha": self.catalog.catalog_sha,
            "text_shas": {p.id: p.sha for p in self.catalog.passages}}

  # --- Writing -------------------------------------------------------------------

  def add(self, documents, computer, chunking: Chunking, *, new_only: bool = False,
          progress: bool = False) -> Report:
    """Commits documents (new ids added, changed texts replaced, the same skipped).

    Every process of a multi-process run calls this with the same documents.

    Args:
      documents: (id, text) pairs or objects with .id and .text.
      computer: the gradient computer (its identity must match the bank's).
      chunking: how long documents are stored.
      new_only: an id already committed is an error (inject).
    Raises (before anything is written): TypeError / ValueError naming the
      document for bad input; ValueError for ids present (new_only) or a
      passage id that another document's passage already has.
    """
    pairs = bank_lib.validate_documents(documents)
    self.bank.check(identity=computer.identity, codec=computer.codec)
    self._plan(pairs, computer.tokenizer, chunking, new_only)  # Raises before the lock.
    with self._lock():
      self._reload()  # Another writer may have committed meanwhile: plan again.
      report, todo = self._plan(pairs, computer.tokenizer, chunking, new_only)
      flat = [(pid, t) for _, _, ps in todo for pid, t in ps]
      report.bank = self.bank.build(flat, computer, progress=progress) if flat else None
      if parallel.is_chief() and todo:
        self._commit_added(todo, report)
      bank_lib._barrier(f"kb-add:{self.workdir}")  # pylint: disable=protected-access
      self._reload()
    return report

  def _plan(self, pairs, tokenizer, chunking: Chunking, new_only: bool):
    """(Report with `skipped`, [(doc id, text, passages)] to commit); raises on ids
    present (new_only) or passage ids two documents would share."""
    cat = self.catalog
    if new_only:
      present = [i for i, _ in pairs if i in cat.documents]
      if present:
        raise ValueError(f"documents already in the knowledge base (remove them first): "
                         f"{present[:10]}")
    report = Report()
    todo = []
    for doc_id, text in pairs:
      if cat.documents.get(doc_id) == text:
        report.skipped += 1
        continue
      todo.append((doc_id, text, split_document(tokenizer, doc_id, text, chunking)))
    owner = {p.id: p.doc_id for p in cat.passages}
    owner.update({pid: d for d, _, ps in todo for pid, _ in ps})
    clash = [pid for d, _, ps in todo for pid, _ in ps if owner.get(pid) != d]
    clash += [d for d, _, _ in todo if owner.get(d, d) != d]
    if clash:
      raise ValueError(f"passage ids {clash[:10]} would belong to two documents "
                       "(a document id that looks like another's '<id>#<n>' passage)")
    return report, todo

  def _commit_added(self, todo, report: Report) -> None:
    """Chief: the rows and checksums of the computed passages -> one catalog commit."""
    bank = self.bank
    bank.refresh()
    rows = bank.committed([pid for _, _, ps in todo for pid, _ in ps])
    legacy = [r for r, c in rows.values() if c is None]  # Format-1 rows, adopted.
    sums = {r: c for r, c in rows.values() if c is not None}
    sums.update(bank.stored_checksums(legacy))
    add = []
    for doc_id, text, ps in todo:
      missing = [pid for pid, _ in ps if pid not in rows]
      if missing:
        reasons = bank.refused
        report.refused[doc_id] = "; ".join(f"{pid}: {reasons.get(pid, 'not computed')}"
                                           for pid in missing)
        continue
      add.append((doc_id, text, [catalog_lib.Passage(
          pid, doc_id, i, t, _sha(t), rows[pid][0], sums[rows[pid][0]],
          bank.is_truncated(rows[pid][0])) for i, (pid, t) in enumerate(ps)]))
      if doc_id in self.catalog.documents:
        report.replaced += 1
      else:
        report.added += 1
      report.passages += len(ps)
    if add:
      self.catalog = self.catalog.commit(add)

  def remove(self, ids) -> Report:
    """Drops committed documents (one catalog commit, then their bank rows are
    tombstoned). KeyError naming unknown ids, before anything is written."""
    if isinstance(ids, str) or not all(isinstance(i, str) for i in ids):
      raise TypeError("remove expects a list of str document ids")
    ids = list(dict.fromkeys(ids))
    self._known(ids)  # Before the lock ...
    with self._lock():
      self._reload()
      self._known(ids)  # ... and under it: another writer may have removed them.
      pids = [p.id for p in self.catalog.passages_of(ids)]
      if parallel.is_chief():
        self.catalog = self.catalog.commit([], remove=ids)
      bank_lib._barrier(f"kb-remove:{self.workdir}")  # pylint: disable=protected-access
      self._reload()
      # After the commit point: rows still marked live in the bank manifest are
      # never served (the catalog does not name them).
      self.bank.delete([i for i in pids if i in self.bank.committed(pids)])
    return Report(removed=len(ids))

  def _known(self, ids) -> None:
    unknown = [i for i in ids if i not in self.catalog.documents]
    if unknown:
      raise KeyError(f"documents not in the knowledge base: {unknown[:10]}")

  def repair(self, passage_ids, computer) -> Report:
    """Recomputes these passages' rows from their stored texts (at the bank's
    theta*, `computer`) and commits the new rows."""
    by_id = {p.id: p for p in self.catalog.passages}
    unknown = [i for i in passage_ids if i not in by_id]
    if unknown:
      raise KeyError(f"passages not in the knowledge base: {unknown[:10]}")
    with self._lock():
      self._reload()
      by_id = {p.id: p for p in self.catalog.passages}
      report = self.bank.replace([(i, by_id[i].text) for i in passage_ids], computer)
      if parallel.is_chief():
        self.bank.refresh()
        rows = self.bank.committed(list(passage_ids))
        docs = {by_id[i].doc_id for i in passage_ids}
        add = [(d, self.catalog.documents[d], [dataclasses.replace(
            p, row=rows[p.id][0], checksum=rows[p.id][1]) if p.id in rows else p
            for p in self.catalog.passages_of([d])]) for d in docs]
        self.catalog = self.catalog.commit(add)
      bank_lib._barrier(f"kb-repair:{self.workdir}")  # pylint: disable=protected-access
      self._reload()
    return Report(replaced=len(passage_ids), bank=report)

  def _reload(self) -> None:
    self.catalog = catalog_lib.Catalog(self.workdir / CATALOG)
    self.bank.refresh()
    self._attach()

  def _lock(self):
    if parallel.is_chief():
      return store.writer_lock(self.workdir, self.lock_timeout, LOCK)
    return _nothing()


class _nothing:  # pylint: disable=invalid-name
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def _sha(text: str) -> str:
  from regrad_jax.bank import compute  # pylint: disable=g-import-not-at-top
  return compute.text_sha(text)


def check_config(config, model_config, lora_config) -> None:
  """Raises ValueError naming each config.lora field that contradicts the saved
  state's LoRA config (e.g. --config.lora.rank=8 against a rank-4 theta*)."""
  from regrad_jax.model.lora import LoraConfig  # pylint: disable=g-import-not-at-top
  given = LoraConfig.from_config(config.lora, model_config)
  bad = [f"{f}={getattr(given, f)!r} (state: {getattr(lora_config, f)!r})"
         for f in ("rank", "alpha", "start", "stop", "targets")
         if getattr(given, f) != getattr(lora_config, f)]
  if bad:
    raise ValueError("the config contradicts the meta-learned state's LoRA config: "
                     + ", ".join(bad) + "; drop the override or use a matching state")


# --- Checking ------------------------------------------------------------------------


@dataclasses.dataclass
class CheckReport:
  """What `check` found: `problems` (each with its repair), `damaged` passage ids."""
  workdir: str = ""
  problems: list = dataclasses.field(default_factory=list)
  damaged: list = dataclasses.field(default_factory=list)
  documents: int = 0
  passages: int = 0

  @property
  def ok(self) -> bool:
    return not self.problems

  def summary(self) -> str:
    """Human-readable lines."""
    if self.ok:
      return (f"knowledge base {self.workdir}: OK ({self.documents} documents, "
              f"{self.passages} passages, every row and the index verified)")
    return "\n".join([f"knowledge base {self.workdir}: {len(self.problems)} problem(s)"]
                     + [f"- {p}" for p in self.problems])


def check(workdir, *, batch_rows: int = 16) -> CheckReport:
  """Verifies catalog, bank (every committed row against its checksum) and index.

  Reads only. Each problem says what to run to repair it.
  """
  workdir = pathlib.Path(workdir)
  out = CheckReport(workdir=str(workdir))
  try:
    kb = KnowledgeBase.open(workdir)
  except (OSError, ValueError) as e:
    out.problems.append(str(e))
    return out
  out.documents, out.passages = len(kb.catalog.documents), len(kb.catalog.passages)
  ps = kb.catalog.passages
  for start in range(0, len(ps), batch_rows):
    batch = ps[start:start + batch_rows]
    try:
      kb.bank.read_rows([p.row for p in batch])
    except bank_lib.BankDamagedError:
      for p in batch:  # Which rows: one at a time.
        try:
          kb.bank.read_rows([p.row])
        except bank_lib.BankDamagedError:
          out.damaged.append(p.id)
  if out.damaged:
    out.problems.append(
        f"{len(out.damaged)} bank rows are missing or damaged (passages "
        f"{out.damaged[:10]}): recompute them from their stored texts at the recorded "
        f"theta*: python -m launch.check_kb --config=CONFIG --workdir={workdir} --repair")
  from regrad_jax.retrieval import retriever as retriever_lib  # pylint: disable=g-import-not-at-top
  index = workdir / "index"
  fix = f"python -m launch.build_index --config=CONFIG --workdir={workdir}"
  try:
    r = retriever_lib.Retriever.load(index) if retriever_lib.saved(index) else None
  except (OSError, ValueError) as e:
    out.problems.append(f"{e}; repair: {fix}")
    return out
  if r is None:
    if ps:
      out.problems.append(f"no index at {index}: {fix}")
  elif (r.stamp or {}).get("catalog_sha") != kb.catalog.catalog_sha:
    out.problems.append(f"index {index} was not saved for this catalog (generation "
                        f"{(r.stamp or {}).get('generation')} vs {kb.catalog.generation}; "
                        f"loads bring it in line in memory): {fix}")
  elif sorted(r.ids) != sorted(p.id for p in ps):
    out.problems.append(f"index {index} does not hold the catalog's passages: {fix}")
  return out
