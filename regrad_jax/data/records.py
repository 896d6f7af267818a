"""Documents, QA records, and readers for every data format the package accepts.

Two record types flow through the whole package:

  Document(id, text, title)  a unit of knowledge: one bank entry, one retrieval
                             target, one gradient.
  QARecord(id, question, answers, passage_id, passage, original_answer)
                             a question with its acceptable answers and (when the
                             dataset has one) the id of its gold document.

Readers fail loudly on malformed input: a missing file, a line that is not JSON
(with its line number), a missing or mistyped field (with the record's position).

Formats:
  - our own JSONL files (see the data README): `read_cpkc`, `read_squad`,
    `read_wiki_summaries`, `read_probe`, `read_general_text`;
  - public QA sets users bring: `read_popqa` (tsv), `read_2wiki`, `read_hotpotqa`
    (json lists with [[title, sentences], ...] contexts), `read_cwq`.
"""
import csv
import dataclasses
import hashlib
import json
import os
import pathlib
import re
from typing import Any, Iterator

PathLike = str | os.PathLike

# Words per chunk when long general text is split into documents: about 400
# tokens, so a chunk fits a 512-token perplexity window.
CHUNK_WORDS = 300


@dataclasses.dataclass(frozen=True)
class Document:
  """A unit of knowledge (bank entry, retrieval target).

  Attributes:
    id: unique within a corpus; the bank and the index key on it.
    text: the document text the gradient is computed on.
    title: optional human-readable title (not part of the trained text).
  """
  id: str
  text: str
  title: str = ""


@dataclasses.dataclass(frozen=True)
class QARecord:
  """A question, its acceptable answers, and where its knowledge lives.

  Attributes:
    id: unique within a split.
    question: the question (for cloze probes: the prompt to complete).
    answers: acceptable answers; metrics take the max over them. Never empty.
    passage_id: id of the gold Document, or None when the dataset has none.
    passage: the gold passage's text, when known.
    original_answer: for counterfactual data (cpkc), the real-world answer the
      passage overrides; None otherwise.
    domain: the dataset the record comes from ("cpkc", "squad", ...); set by
      `data.load_split`, used to sample and evaluate mixtures per domain.
  """
  id: str
  question: str
  answers: tuple[str, ...]
  passage_id: str | None
  passage: str | None = None
  original_answer: str | None = None
  domain: str = ""


# --------------------------------------------------------------------------
# Low-level helpers: file access and field checks with located error messages.


def _check_file(path: PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"Data file not found: {path}")
  return path


def iter_jsonl(path: PathLike) -> Iterator[tuple[str, dict]]:
  """Yields (location "path:line", object) for each non-empty line of a JSONL file."""
  path = _check_file(path)
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno}).") from None
      if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
      yield where, obj


def _read_json_list(path: PathLike) -> Iterator[tuple[str, dict]]:
  """Yields (location "path[i]", object) for each item of a JSON file holding a list."""
  path = _check_file(path)
  with open(path, encoding="utf-8") as f:
    try:
      items = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, "
                       f"column {e.colno}).") from None
  if not isinstance(items, list):
    raise ValueError(f"{path}: expected a JSON list of records, got {type(items).__name__}.")
  for i, obj in enumerate(items):
    where = f"{path}[{i}]"
    if not isinstance(obj, dict):
      raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
    yield where, obj


def _field(obj: dict, key: str, where: str, kind: type | tuple[type, ...] = str,
           optional: bool = False) -> Any:
  """obj[key], checked for presence and type (None allowed only if optional)."""
  if key not in obj:
    if optional:
      return None
    raise ValueError(f"{where}: missing field {key!r} (fields present: {sorted(obj)}).")
  value = obj[key]
  if value is None and optional:
    return None
  if not isinstance(value, kind):
    raise ValueError(f"{where}: field {key!r} should be {_kind_name(kind)}, "
                     f"got {type(value).__name__}.")
  return value


def _kind_name(kind) -> str:
  kinds = kind if isinstance(kind, tuple) else (kind,)
  return " or ".join(k.__name__ for k in kinds)


def _answers(values: Any, where: str, key: str) -> tuple[str, ...]:
  """A non-empty tuple of distinct answer strings, in their given order."""
  if isinstance(values, str):
    values = [values]
  if not isinstance(values, list) or not values:
    raise ValueError(f"{where}: field {key!r} should be a non-empty list of strings.")
  out = []
  for v in values:
    if not isinstance(v, str):
      raise ValueError(f"{where}: field {key!r} holds a {type(v).__name__}, not a string.")
    if v not in out:
      out.append(v)
  return tuple(out)


def _limited(items: Iterator, limit: int | None) -> Iterator:
  if limit is not None and limit < 0:
    raise ValueError(f"limit must be None or >= 0, got {limit}.")
  for i, item in enumerate(items):
    if limit is not None and i >= limit:
      return
    yield item


def chunk_words(text: str, size: int = CHUNK_WORDS) -> list[str]:
  """Splits text into consecutive chunks of `size` whitespace-separated words.

  Words in a chunk are joined by single spaces (line structure is dropped; the
  last chunk may be shorter). Used for perplexity text of a bounded length.
  """
  if size <= 0:
    raise ValueError(f"chunk size must be positive, got {size}.")
  words = text.split()
  return [" ".join(words[i:i + size]) for i in range(0, len(words), size)]


# --------------------------------------------------------------------------
# Our own formats (see the data README for provenance).


def read_cpkc(path: PathLike) -> tuple[list[Document], list[QARecord]]:
  """Reads a cpkc split (JSONL: id, passage, question, answer, original_answer).

  Each record brings its own passage, so document i has the id of record i.
  """
  docs, records = [], []
  for where, obj in iter_jsonl(path):
    rid = _field(obj, "id", where)
    passage = _field(obj, "passage", where)
    docs.append(Document(id=rid, text=passage))
    records.append(QARecord(
        id=rid,
        question=_field(obj, "question", where),
        answers=(_field(obj, "answer", where),),
        passage_id=rid,
        passage=passage,
        original_answer=_field(obj, "original_answer", where, optional=True)))
  return docs, records


def read_squad(path: PathLike) -> tuple[list[Document], list[QARecord]]:
  """Reads a squad split (JSONL: id, passage, question, answer, answers, source).

  About five questions share a paragraph, and a paragraph may occur twice: as
  SQuAD wrote it (source "question_selection") and whitespace-tokenised
  ("disfl_qa": "40 , 000"). Both forms are one Document, id
  "squad-" + sha256 of the text with all whitespace removed (12 hex), holding
  the untokenised form when the file has it (else the first seen). `answers`
  holds the span as written in the record's own passage and the raw SQuAD
  answer (a prediction in either form scores), first one the kept text contains.
  """
  texts: dict[str, tuple[str, bool]] = {}  # doc id -> (text, untokenised form)
  records = []
  for where, obj in iter_jsonl(path):
    passage = _field(obj, "passage", where)
    doc_id = "squad-" + hashlib.sha256(re.sub(r"\s+", "", passage).encode()).hexdigest()[:12]
    raw = _field(obj, "source", where) == "question_selection"
    if doc_id not in texts or (raw and not texts[doc_id][1]):
      texts[doc_id] = (passage, raw)
    answers = [_field(obj, "answer", where)] + _field(obj, "answers", where, list)
    records.append(QARecord(id=_field(obj, "id", where),
                            question=_field(obj, "question", where),
                            answers=_answers(answers, where, "answers"), passage_id=doc_id))
  docs = [Document(id=i, text=t) for i, (t, _) in texts.items()]
  out = []
  for r in records:  # The training target: a form the kept passage contains.
    text = texts[r.passage_id][0]
    answers = sorted(r.answers, key=lambda a: a not in text)
    out.append(dataclasses.replace(r, answers=tuple(answers), passage=text))
  return docs, out


def read_wiki_summaries(path: PathLike, limit: int | None = None) -> list[Document]:
  """Reads Wikipedia summaries (JSONL: id, title, text); the first `limit` if given."""
  return [Document(id=_field(obj, "id", where), text=_field(obj, "text", where),
                   title=_field(obj, "title", where))
          for where, obj in _limited(iter_jsonl(path), limit)]


def read_probe(path: PathLike, limit: int | None = None) -> list[QARecord]:
  """Reads the closed-book probe (JSONL: id, prompt, answers); question = prompt."""
  return [QARecord(id=_field(obj, "id", where), question=_field(obj, "prompt", where),
                   answers=_answers(_field(obj, "answers", where, list), where, "answers"),
                   passage_id=None)
          for where, obj in _limited(iter_jsonl(path), limit)]


def read_general_text(root: PathLike) -> list[Document]:
  """General text for perplexity, in chunks of CHUNK_WORDS words.

  Reads root/general_text/moby_dick.txt (ids "moby-dick-0000", ...) and
  root/general_text/sotu.jsonl (one address per line, fields id, text; ids
  "<address id>-000", ...). Long texts are chunked so every document fits a
  perplexity window.
  """
  folder = pathlib.Path(root) / "general_text"
  moby = _check_file(folder / "moby_dick.txt").read_text(encoding="utf-8")
  docs = [Document(id=f"moby-dick-{i:04d}", text=t, title="Moby-Dick")
          for i, t in enumerate(chunk_words(moby))]
  for where, obj in iter_jsonl(folder / "sotu.jsonl"):
    sid = _field(obj, "id", where)
    docs += [Document(id=f"{sid}-{i:03d}", text=t, title=f"State of the Union {sid}")
             for i, t in enumerate(chunk_words(_field(obj, "text", where)))]
  return docs


# --------------------------------------------------------------------------
# Public QA formats users bring.


def read_popqa(path: PathLike) -> tuple[list[Document], list[QARecord]]:
  """Reads PopQA (tsv with columns id, subj, prop, obj, question, possible_answers).

  `possible_answers` is a JSON list string. PopQA has no passages: the documents
  list is empty and passage_id is None (retrieve from a corpus of your own).
  """
  path = _check_file(path)
  records = []
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f, delimiter="\t")
    missing = {"id", "question", "possible_answers"} - set(reader.fieldnames or ())
    if missing:
      raise ValueError(f"{path}: missing column(s) {sorted(missing)} "
                       f"(header: {reader.fieldnames}).")
    for lineno, row in enumerate(reader, 2):
      where = f"{path}:{lineno}"
      try:
        answers = json.loads(row["possible_answers"] or "")
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: possible_answers is not a JSON list ({e.msg}).") from None
      records.append(QARecord(id=str(row["id"]), question=row["question"],
                              answers=_answers(answers, where, "possible_answers"),
                              passage_id=None))
  return [], records


def _read_multihop(path: PathLike) -> tuple[list[Document], list[QARecord]]:
  """HotpotQA / 2WikiMultihopQA: {_id, question, answer, context, supporting_facts?}.

  Each context entry [title, [sentences]] becomes a Document (text = the
  sentences joined by single spaces, id = the title). The same title recurs
  across questions; an identical paragraph is kept once, a different paragraph
  under a known title gets the id "title#2", "title#3", ... A record's
  passage_id is its first supporting fact's document (None without
  supporting_facts); the other supporting documents are in the corpus too.
  """
  docs: dict[str, Document] = {}
  by_title: dict[str, list[str]] = {}  # title -> ids of its distinct paragraphs
  records = []
  for where, obj in _read_json_list(path):
    context = _field(obj, "context", where, list)
    local: dict[str, str] = {}  # title -> document id, for this question
    for j, entry in enumerate(context):
      if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str)
          or not isinstance(entry[1], list)
          or not all(isinstance(s, str) for s in entry[1])):
        raise ValueError(f"{where}: context[{j}] should be [title, [sentences]].")
      title, sentences = entry
      text = " ".join(s.strip() for s in sentences if s.strip())
      ids = by_title.setdefault(title, [])
      doc_id = next((i for i in ids if docs[i].text == text), None)
      if doc_id is None:
        doc_id = title if not ids else f"{title}#{len(ids) + 1}"
        ids.append(doc_id)
        docs[doc_id] = Document(id=doc_id, text=text, title=title)
      local[title] = doc_id
    facts = _field(obj, "supporting_facts", where, list, optional=True) or []
    gold = next((local[f[0]] for f in facts
                 if isinstance(f, list) and f and f[0] in local), None)
    records.append(QARecord(
        id=str(_field(obj, "_id", where)), question=_field(obj, "question", where),
        answers=(_field(obj, "answer", where),), passage_id=gold,
        passage=docs[gold].text if gold is not None else None))
  return list(docs.values()), records


def read_2wiki(path: PathLike) -> tuple[list[Document], list[QARecord]]:
  """Reads 2WikiMultihopQA (json list; see `_read_multihop` for the mapping)."""
  return _read_multihop(path)


def read_hotpotqa(path: PathLike) -> tuple[list[Document], list[QARecord]]:
  """Reads HotpotQA (json list; see `_read_multihop` for the mapping)."""
  return _read_multihop(path)


def read_cwq(path: PathLike) -> tuple[list[Document], list[QARecord]]:
  """Reads ComplexWebQuestions (json list of {ID, question, answers: [...]}).

  Every answer entry {answer, aliases, answer_id} contributes its answer and
  aliases to the acceptable answers. CWQ has no passages: documents are empty.
  """
  records = []
  for where, obj in _read_json_list(path):
    golds = []
    for j, a in enumerate(_field(obj, "answers", where, list)):
      if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
        raise ValueError(f"{where}: answers[{j}] should be an object with a string 'answer'.")
      golds += [a["answer"]] + list(a.get("aliases") or [])
    records.append(QARecord(id=str(_field(obj, "ID", where)),
                            question=_field(obj, "question", where),
                            answers=_answers(golds, where, "answers"), passage_id=None))
  return [], records
