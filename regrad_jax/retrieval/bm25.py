"""BM25 over document texts (bm25s), behind the same interface as the dense indexes.

Text is lower-cased, split with bm25s' regex tokenizer (words of 2+ word
characters) and English stopwords are dropped; no stemming (the reference
ReGrad retriever is plain BM25 on the question). Query words absent from the
corpus are ignored; a query left with none scores every document 0.

`neighbours` picks the passages of meta-learning tasks (meta/tasks.py) with it.

On disk: `index.json` (ids) and bm25s' own files in `bm25s/` (score arrays as
.npy written and read with allow_pickle=False, vocabulary and parameters as
JSON, the texts as `corpus.jsonl`, which `add` / `remove` need to rebuild).
"""
import shutil

import numpy as np

from regrad_jax.retrieval import index as index_lib


def _bm25s():
  # NB: imported on first use, not at module import: `import bm25s` runs a JAX op
  # (jax.lax.top_k), which would start the backend before a multi-host launch can
  # call jax.distributed.initialize().
  import bm25s
  return bm25s


def _tokenize(texts: list[str]) -> list[list[str]]:
  return _bm25s().tokenize(texts, lower=True, stopwords="en", return_ids=False, show_progress=False)


class BM25Index(index_lib.Index):
  """Okapi BM25 (bm25s "lucene" variant) with parameters k1 and b."""
  kind = "bm25"

  def __init__(self, k1: float = 1.5, b: float = 0.75):
    super().__init__()
    self.k1, self.b = k1, b
    self._corpus: list[str] = []
    self._bm25 = None

  def knobs(self):
    """Constructor arguments saved with the index: {"k1", "b"}."""
    return {"k1": self.k1, "b": self.b}

  def _check_rows(self, ids, texts, embeddings):
    if texts is None or isinstance(texts, str) or len(texts) != len(ids):
      raise ValueError(f"BM25 needs one text per id ({len(ids)} ids).")
    bad = [i for i, t in zip(ids, texts) if not isinstance(t, str)]
    if bad:
      raise TypeError(f"Texts must be strings (ids {bad[:3]}).")
    return list(texts), None

  def _texts(self):
    return list(self._corpus)

  def _set_rows(self, ids, texts, embeddings):
    self._ids, self._corpus, self._bm25 = ids, texts, None
    if ids:
      self._bm25 = _bm25s().BM25(k1=self.k1, b=self.b)
      self._bm25.index(_tokenize(texts), show_progress=False)

  def _search_rows(self, queries, k):
    if isinstance(queries, str) or not queries or not all(isinstance(q, str) for q in queries):
      raise TypeError("BM25 searches a non-empty list of query strings.")
    rows, scores = self._bm25.retrieve(_tokenize(list(queries)), k=k, show_progress=False,
                                       backend_selection="numpy")
    return np.asarray(rows, np.int64), np.asarray(scores, np.float32)

  def _save_extra(self, directory):
    bdir = directory / "bm25s"
    if bdir.exists():
      shutil.rmtree(bdir)
    if self._bm25 is not None:
      self._bm25.save(str(bdir), corpus=self._corpus, show_progress=False,
                      raise_on_serialization_error=True)

  def _load_extra(self, directory, ids):
    self._ids, self._corpus, self._bm25 = ids, [], None
    if not ids:
      return
    self._bm25 = _bm25s().BM25.load(str(directory / "bm25s"), load_corpus=True, mmap=False,
                                    allow_pickle=False, show_progress=False)
    # bm25s saves plain-string corpus entries as {"id": row, "text": text}.
    self._corpus = [doc["text"] for doc in self._bm25.corpus]
    self._bm25.corpus = None  # We map rows to ids ourselves.
    if len(self._corpus) != len(ids):
      raise ValueError(f"{directory}: {len(ids)} ids but {len(self._corpus)} BM25 texts.")


def neighbours(ids, texts, questions, k: int, gold=None) -> list[list[str]]:
  """The ids of each question's k passages, by BM25 over one corpus.

  Args:
    ids, texts: the corpus, (N,) each.
    questions: Q question strings.
    k: passages per question.
    gold: None: each question's top-k hits in rank order (as the reference
      ReGrad trains; its gold passage is not guaranteed to be among them). Or Q
      ids: question q's gold passage first, then its k-1 best other hits.
  Returns:
    Q lists of min(k, N) ids (with gold and k = 1, [gold], and no index is built).
  """
  hits = [[] for _ in questions]
  if k > 1 or gold is None:
    index = BM25Index()
    index.build(list(ids), list(texts))
    hits = index.search(list(questions), k)[0]
  if gold is None:
    return hits
  return [[g] + [h for h in row if h != g][:k - 1] for g, row in zip(gold, hits)]
