"""Retriever: documents in, top-k document ids per question out.

Stage 3 of ReGrad retrieves the top-K documents for each question, then
fetches their gradients from the bank by id. The retriever is an encoder
(MiniLM, or the random tiny one) plus a dense index (ScaNN or brute force), or
BM25 on the raw text, chosen by `config.retrieval`:

  retriever = Retriever.build(config, documents)  # objects with .id and .text
  ids, scores = retriever.search(questions, k=3)   # list[list[str]], (Q, k')
  retriever.save(directory); Retriever.load(directory)

Ids are the documents' own ids, the same keys as the bank's rows; `add`
(upsert) and `remove` keep the index in step when the bank changes.

On disk. `save(directory, stamp)` writes the index into a fresh folder
directory/v-<uuid>/ and then, as its commit point, directory/current.json
(atomic rename): the folder's name, a sha256 of every file in it, a hash of the
ids in row order, the caller's `stamp` (the knowledge base's catalog generation
and hash) and a hash of all that. Older folders are removed after. `load`
verifies every hash: a changed, missing or swapped file or id is an
IndexDamagedError naming it. A folder saved before current.json existed (files
directly in `directory`) still loads, unverified and with no stamp.
"""
import hashlib
import json
import os
import pathlib
import shutil
import uuid
from typing import Any, Iterable, Sequence

from absl import logging
import numpy as np

from regrad_jax.bank import store
from regrad_jax.retrieval import bm25
from regrad_jax.retrieval import encoder as encoder_lib
from regrad_jax.retrieval import index as index_lib

_RETRIEVER_JSON = "retriever.json"
_CURRENT = "current.json"
_LEGACY = ("index.json", "embeddings.npy", _RETRIEVER_JSON, "scann", "bm25s")


class IndexDamagedError(ValueError):
  """A saved index does not match its hashes (or a file is missing)."""


def saved(directory) -> bool:
  """Whether `directory` holds a saved retriever (either layout)."""
  d = pathlib.Path(directory)
  return (d / _CURRENT).is_file() or (d / _RETRIEVER_JSON).is_file()


def _file_sha(path: pathlib.Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def make_index(retrieval_config) -> index_lib.Index:
  """An empty index for `config.retrieval.backend` (scann | brute | bm25)."""
  backend = retrieval_config.backend
  if backend == "scann":
    return index_lib.ScannIndex.from_config(retrieval_config.scann)
  if backend == "brute":
    return index_lib.BruteForceIndex()
  if backend == "bm25":
    return bm25.BM25Index()
  raise ValueError(f"Unknown retrieval backend {backend!r}; use scann, brute or bm25.")


def make_encoder(name: str) -> encoder_lib.Encoder:
  """`config.retrieval.encoder`: "tiny", a registry name ("minilm") or a BERT folder."""
  if name == "tiny":
    return encoder_lib.Encoder.tiny()
  return encoder_lib.Encoder.load(name)


def load_index(directory: str | os.PathLike) -> index_lib.Index:
  """Loads a saved index of any kind."""
  kinds = {c.kind: c for c in (index_lib.BruteForceIndex, index_lib.ScannIndex, bm25.BM25Index)}
  kind = index_lib.read_index_meta(pathlib.Path(directory))["kind"]
  if kind not in kinds:
    raise ValueError(f"{directory}: unknown index kind {kind!r}; known {sorted(kinds)}.")
  return kinds[kind].load(directory)


class Retriever:
  """An index plus, for dense backends, the encoder that embeds texts for it.

  Attributes:
    index: any `index.Index`.
    encoder: an `encoder.Encoder`, or None for BM25.
    batch_size: texts per encoder call.
  """

  def __init__(self, index: index_lib.Index, encoder: encoder_lib.Encoder | None,
               batch_size: int = 64):
    dense = isinstance(index, index_lib.DenseIndex)
    if dense != (encoder is not None):
      raise ValueError("A dense index needs an encoder; BM25 takes none.")
    if dense and len(index) and index.dim != encoder.dim:
      raise ValueError(f"Index dim {index.dim} != encoder dim {encoder.dim}.")
    self.index, self.encoder, self.batch_size = index, encoder, batch_size
    self.stamp = None  # What `save` was given (set by `load`).

  @classmethod
  def build(cls, config, documents: Iterable[Any]) -> "Retriever":
    """Indexes `documents` (objects with string .id and .text) as `config.retrieval` says."""
    rc = config.retrieval
    index = make_index(rc)
    encoder = None if isinstance(index, bm25.BM25Index) else make_encoder(rc.encoder)
    retriever = cls(index, encoder, rc.batch_size)
    ids, texts = _unpack(documents)
    if not ids:
      raise ValueError("No documents to index.")
    index.build(ids, texts, retriever._embed(texts))
    logging.info("Indexed %d documents with %s.", len(index), index.kind)
    return retriever

  def __len__(self) -> int:
    return len(self.index)

  @property
  def ids(self) -> list[str]:
    """Indexed document ids in row order (a copy)."""
    return self.index.ids

  def add(self, documents: Iterable[Any]) -> None:
    """Upserts documents (a known id is replaced)."""
    ids, texts = _unpack(documents)
    if ids:
      self.index.add(ids, texts, self._embed(texts))

  def remove(self, ids: Sequence[str]) -> None:
    """Deletes documents by id; KeyError if any is not indexed."""
    self.index.remove(ids)

  def search(self, questions: Sequence[str], k: int) -> tuple[list[list[str]], np.ndarray]:
    """Top-k document ids per question.

    Args:
      questions: non-empty list of non-empty strings.
      k: documents per question; if the index holds fewer than k documents,
        all of them are returned (k' = min(k, len(self))).

    Returns:
      ids (Q lists of k' ids, best first) and scores (Q, k') float32.
    """
    if isinstance(questions, str):
      raise TypeError("search() takes a list of questions, not one string.")
    questions = list(questions)
    if not questions:
      raise ValueError("search() got no questions.")
    empty = [i for i, q in enumerate(questions) if not isinstance(q, str) or not q.strip()]
    if empty:
      raise ValueError(f"Empty or non-string questions at positions {empty[:10]}.")
    if len(self.index) == 0:
      raise ValueError("The retriever's index is empty: build it or add documents first.")
    queries = questions if self.encoder is None else self._embed(questions)
    return self.index.search(queries, k)

  def save(self, directory: str | os.PathLike, stamp: dict | None = None) -> None:
    """Writes the index plus retriever.json (encoder spec, batch size) into a new
    folder under `directory`, then commits it with current.json (module
    docstring); `stamp` (JSON) is stored with it and returned by `load`."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"v-{uuid.uuid4().hex[:12]}"
    folder = directory / name
    self.index.save(folder)
    meta = {"encoder": None if self.encoder is None else self.encoder.spec,
            "batch_size": self.batch_size}
    (folder / _RETRIEVER_JSON).write_text(json.dumps(meta))
    files = {}
    for p in sorted(folder.rglob("*")):
      if p.is_file():
        with open(p, "rb") as f:
          os.fsync(f.fileno())
        files[str(p.relative_to(folder))] = _file_sha(p)
    pointer = {"format_version": 1, "dir": name, "files": files,
               "ids_sha": store.json_sha(self.index.ids), "stamp": stamp}
    pointer["sha256"] = store.json_sha(pointer)
    store.write_json_atomic(directory / _CURRENT, pointer)  # The commit point.
    for old in directory.iterdir():  # Earlier saves (and a legacy layout's files).
      if old.name == name or not (old.name.startswith("v-") or old.name in _LEGACY):
        continue
      if old.is_dir():
        shutil.rmtree(old)
      else:
        old.unlink()

  @classmethod
  def load(cls, directory: str | os.PathLike) -> "Retriever":
    """Reads a retriever written by `save`, verified, rebuilding its encoder from
    the spec. IndexDamagedError names a file or id that does not match."""
    directory = pathlib.Path(directory)
    folder, pointer = directory, None
    if (directory / _CURRENT).is_file():
      pointer = store.read_json(directory / _CURRENT)
      if pointer.get("sha256") != store.json_sha(
          {k: v for k, v in pointer.items() if k != "sha256"}):
        raise IndexDamagedError(f"{directory / _CURRENT} was altered (does not match "
                                "its sha256)")
      folder = directory / pointer["dir"]
      for rel, sha in pointer["files"].items():
        if not (folder / rel).is_file():
          raise IndexDamagedError(f"index file {folder / rel} is missing")
        if _file_sha(folder / rel) != sha:
          raise IndexDamagedError(f"index file {folder / rel} was altered (does not "
                                  "match its sha256)")
    path = folder / _RETRIEVER_JSON
    if not path.is_file():
      raise FileNotFoundError(f"No saved retriever in {directory} (missing {_RETRIEVER_JSON}).")
    meta = json.loads(path.read_text())
    encoder = None if meta["encoder"] is None else encoder_lib.Encoder.from_spec(meta["encoder"])
    out = cls(load_index(folder), encoder, meta["batch_size"])
    if pointer is not None:
      if store.json_sha(out.ids) != pointer["ids_sha"]:
        raise IndexDamagedError(f"index {folder}: its ids do not match the hash saved "
                                "with them")
      out.stamp = pointer["stamp"]
    return out

  def _embed(self, texts: list[str]) -> np.ndarray | None:
    if self.encoder is None:
      return None
    return self.encoder.embed(texts, batch_size=self.batch_size)


def _unpack(documents: Iterable[Any]) -> tuple[list[str], list[str]]:
  docs = list(documents)
  bad = [d for d in docs if not (isinstance(getattr(d, "id", None), str)
                                 and isinstance(getattr(d, "text", None), str))]
  if bad:
    raise TypeError(f"Documents need string .id and .text attributes; got {bad[0]!r}.")
  return [d.id for d in docs], [d.text for d in docs]


def build_and_save(config, workdir: str | os.PathLike) -> Retriever:
  """Indexes exactly the knowledge base's committed passages (launch.build_bank
  and injections; removed documents excluded) and saves it to `workdir`/index."""
  # Imported here, not at the top: the knowledge base imports this package.
  from regrad_jax import kb as kb_lib
  kb = kb_lib.KnowledgeBase.open(workdir)
  retriever = Retriever.build(config, kb.passages)
  kb.save_index(retriever)
  out = pathlib.Path(workdir) / "index"
  logging.info("Saved the %s index of %d documents to %s.", retriever.index.kind, len(retriever), out)
  return retriever
