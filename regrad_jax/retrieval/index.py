"""Nearest-neighbour indexes over document ids: one interface, three backends.

Every index maps string document ids to rows and answers top-k queries:

  index = ScannIndex(...).build(ids, texts, embeddings)
  ids, scores = index.search(query_embeddings, k)   # list[list[str]], (Q, k')
  index.add(new_ids, new_texts, new_embeddings)     # upsert: a known id is replaced
  index.remove(old_ids)
  index.save(directory); ScannIndex.load(directory) # or load_index(directory)

`k' = min(k, len(index))`: asking for more documents than the index holds
returns them all. Scores are larger-is-better (dot product for the dense
indexes, BM25 score for `bm25.BM25Index`), sorted in decreasing order.

Dense backends (queries are (Q, D) embeddings):
- `BruteForceIndex`: exact NumPy dot products; the oracle for tests.
- `ScannIndex`: ScaNN (k-means tree partitions + anisotropic quantisation +
  exact reordering); exact brute force below `brute_force_below` rows.

On disk a dense index is `index.json` (kind, ids, knobs) + `embeddings.npy`
(loaded with allow_pickle=False) + for ScaNN the serialised searcher in
`scann/`. Nothing is pickled: ScaNN's own `load_searcher` would unpickle a
`scann_docids.pkl`, so we keep ids in our JSON and load the searcher's assets
through `ScannNumpy` directly.
"""
import abc
import collections
import json
import math
import os
import pathlib
import shutil
from typing import Any, Sequence

import numpy as np
from scann.scann_ops.py import scann_ops_pybind

_INDEX_JSON = "index.json"
_EMBEDDINGS = "embeddings.npy"
_FORMAT_VERSION = 1


def exact_search(db: np.ndarray, queries: np.ndarray, k: int,
                 chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k by dot product, over `db` in row chunks to bound memory.

  Args:
    db: (N, D) float32. queries: (Q, D) float32. k: 1 <= k <= N.

  Returns:
    rows (Q, k) int64 and scores (Q, k) float32, best first.
  """
  q = queries.shape[0]
  best_rows = np.zeros((q, 0), np.int64)
  best_scores = np.zeros((q, 0), np.float32)
  for start in range(0, db.shape[0], chunk):
    scores = queries @ db[start:start + chunk].T
    kk = min(k, scores.shape[1])
    top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    best_rows = np.concatenate([best_rows, top + start], axis=1)
    best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
    if best_rows.shape[1] > k:
      keep = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]
      best_rows = np.take_along_axis(best_rows, keep, 1)
      best_scores = np.take_along_axis(best_scores, keep, 1)
  order = np.argsort(-best_scores, axis=1, kind="stable")
  return np.take_along_axis(best_rows, order, 1), np.take_along_axis(best_scores, order, 1)


class Index(abc.ABC):
  """Ids, their bookkeeping, and the public interface shared by all backends.

  Subclasses implement `_set_rows` (store rows and (re)build), `_search_rows`,
  `_save_extra` / `_load_extra`, and `knobs()`.
  """
  kind: str = ""

  def __init__(self):
    self._ids: list[str] = []

  def __len__(self) -> int:
    return len(self._ids)

  @property
  def ids(self) -> list[str]:
    """Document ids in row order (a copy)."""
    return list(self._ids)

  def build(self, ids: Sequence[str], texts: Sequence[str] | None,
            embeddings: np.ndarray | None = None) -> "Index":
    """Replaces the whole contents. Returns self."""
    ids = _check_ids(ids)
    self._set_rows(ids, *self._check_rows(ids, texts, embeddings))
    return self

  def add(self, ids: Sequence[str], texts: Sequence[str] | None,
          embeddings: np.ndarray | None = None) -> "Index":
    """Upserts documents: new ids are appended, known ids replaced in place.

    Backends rebuild from their stored rows: neither ScaNN nor bm25s has a
    cheap exact delete (ScaNN's own upsert/delete keep docids in a pickle and
    leave the partitions trained on old data). Returns self.
    """
    ids = _check_ids(ids)
    if not self._ids:
      return self.build(ids, texts, embeddings)
    texts, embeddings = self._check_rows(ids, texts, embeddings)
    all_ids, all_texts, all_emb = list(self._ids), self._texts(), self._embeddings()
    row = {d: i for i, d in enumerate(all_ids)}
    append = []
    for j, d in enumerate(ids):
      if d in row:
        if all_texts is not None:
          all_texts[row[d]] = texts[j]
        if all_emb is not None:
          all_emb[row[d]] = embeddings[j]
      else:
        append.append(j)
    all_ids += [ids[j] for j in append]
    if all_texts is not None:
      all_texts += [texts[j] for j in append]
    if all_emb is not None:
      all_emb = np.concatenate([all_emb, embeddings[append]], axis=0)
    self._set_rows(all_ids, all_texts, all_emb)
    return self

  def remove(self, ids: Sequence[str]) -> "Index":
    """Deletes documents by id; an unknown id is a KeyError. Returns self."""
    ids = set(_check_ids(ids))
    missing = ids.difference(self._ids)
    if missing:
      raise KeyError(f"Cannot remove ids not in the index: {sorted(missing)[:10]}.")
    keep = [i for i, d in enumerate(self._ids) if d not in ids]
    texts, emb = self._texts(), self._embeddings()
    self._set_rows([self._ids[i] for i in keep],
                   None if texts is None else [texts[i] for i in keep],
                   None if emb is None else emb[keep])
    return self

  def search(self, queries, k: int) -> tuple[list[list[str]], np.ndarray]:
    """Top-k documents per query.

    Args:
      queries: (Q, D) embeddings for dense indexes; list of strings for BM25.
      k: documents wanted per query (>= 1); capped at len(self).

    Returns:
      ids: Q lists of min(k, len(self)) ids, best first.
      scores: (Q, min(k, len(self))) float32, decreasing along each row.
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
      raise ValueError(f"k must be a positive integer, got {k!r}.")
    if not self._ids:
      raise ValueError(f"The {self.kind} index is empty: build() or add() documents first.")
    rows, scores = self._search_rows(queries, min(int(k), len(self._ids)))
    return [[self._ids[r] for r in row] for row in rows], np.asarray(scores, np.float32)

  def save(self, directory: str | os.PathLike) -> None:
    """Writes the index to `directory` (created; our files in it overwritten)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / _INDEX_JSON).unlink(missing_ok=True)
    self._save_extra(directory)
    meta = {"kind": self.kind, "format_version": _FORMAT_VERSION, "ids": self._ids,
            "knobs": self.knobs()}
    # index.json last: a folder without it is an incomplete save.
    (directory / _INDEX_JSON).write_text(json.dumps(meta, ensure_ascii=False))

  @classmethod
  def load(cls, directory: str | os.PathLike) -> "Index":
    """Reads an index written by `save` (of this class's kind)."""
    directory = pathlib.Path(directory)
    meta = read_index_meta(directory)
    if meta["kind"] != cls.kind:
      raise ValueError(f"{directory} holds a {meta['kind']!r} index, not {cls.kind!r}.")
    index = cls(**meta["knobs"])
    index._load_extra(directory, list(meta["ids"]))
    return index

  @abc.abstractmethod
  def knobs(self) -> dict[str, Any]:
    """Constructor arguments (JSON-able), saved and passed back by `load`."""

  @abc.abstractmethod
  def _check_rows(self, ids, texts, embeddings):
    """Validates one batch of rows. Returns (texts or None, embeddings or None)."""

  @abc.abstractmethod
  def _set_rows(self, ids: list[str], texts, embeddings) -> None:
    """Stores the complete rows and rebuilds the search structure."""

  @abc.abstractmethod
  def _search_rows(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k) row numbers and scores, best first; 1 <= k <= len(self)."""

  @abc.abstractmethod
  def _save_extra(self, directory: pathlib.Path) -> None:
    ...

  @abc.abstractmethod
  def _load_extra(self, directory: pathlib.Path, ids: list[str]) -> None:
    ...

  def _texts(self) -> list[str] | None:
    return None

  def _embeddings(self) -> np.ndarray | None:
    return None


def _check_ids(ids: Sequence[str]) -> list[str]:
  if isinstance(ids, str):
    raise TypeError("ids must be a sequence of strings, not one string.")
  ids = list(ids)
  bad = [d for d in ids if not isinstance(d, str)]
  if bad:
    raise TypeError(f"Document ids must be strings, got {bad[:3]!r}.")
  if len(set(ids)) != len(ids):
    dup = sorted(d for d, c in collections.Counter(ids).items() if c > 1)
    raise ValueError(f"Duplicate document ids: {dup[:10]}.")
  return ids


def read_index_meta(directory: pathlib.Path) -> dict[str, Any]:
  """The index.json `save` wrote ({"kind", "format_version", "ids", "knobs"}).

  FileNotFoundError if there is none (no or incomplete save); ValueError for
  another format_version.
  """
  path = pathlib.Path(directory) / _INDEX_JSON
  if not path.is_file():
    raise FileNotFoundError(f"No saved index in {directory} (missing {_INDEX_JSON}).")
  meta = json.loads(path.read_text())
  if meta.get("format_version") != _FORMAT_VERSION:
    raise ValueError(f"{path}: unsupported format_version {meta.get('format_version')!r}.")
  return meta


class DenseIndex(Index):
  """An index over (N, D) float32 embeddings; texts are not needed or kept."""

  def __init__(self):
    super().__init__()
    self._emb = np.zeros((0, 0), np.float32)

  @property
  def dim(self) -> int:
    """Embedding width D (0 until rows are stored)."""
    return self._emb.shape[1]

  @property
  def embeddings(self) -> np.ndarray:
    """(N, D) float32 rows in `ids` order (read-only view)."""
    view = self._emb.view()
    view.flags.writeable = False
    return view

  def _check_rows(self, ids, texts, embeddings):
    if embeddings is None:
      raise ValueError(f"The {self.kind} index needs embeddings.")
    emb = np.asarray(embeddings, np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(ids):
      raise ValueError(f"embeddings must be (len(ids)={len(ids)}, D), got {emb.shape}.")
    if self._ids and emb.shape[1] != self.dim:
      raise ValueError(f"embeddings have dim {emb.shape[1]}, the index has {self.dim}.")
    if not np.isfinite(emb).all():
      raise ValueError("embeddings contain NaN or inf.")
    return None, emb

  def _embeddings(self):
    return self._emb.copy()

  def _set_rows(self, ids, texts, embeddings):
    self._ids, self._emb = ids, np.ascontiguousarray(embeddings, np.float32)
    self._rebuild()

  def _rebuild(self) -> None:
    """Rebuilds the search structure from self._emb (nothing by default)."""

  def _check_queries(self, queries) -> np.ndarray:
    if isinstance(queries, (list, tuple)) and queries and isinstance(queries[0], str):
      raise TypeError(f"The {self.kind} index searches embeddings; embed the texts first "
                      "(retrieval.Retriever does).")
    q = np.asarray(queries, np.float32)
    if q.ndim != 2 or q.shape[1] != self.dim or q.shape[0] == 0:
      raise ValueError(f"queries must be (Q >= 1, {self.dim}), got {q.shape}.")
    return q

  def _save_extra(self, directory):
    np.save(directory / _EMBEDDINGS, self._emb, allow_pickle=False)

  def _load_extra(self, directory, ids):
    emb = np.load(directory / _EMBEDDINGS, allow_pickle=False)
    if emb.shape[0] != len(ids):
      raise ValueError(f"{directory}: {len(ids)} ids but {emb.shape[0]} embeddings.")
    self._ids, self._emb = ids, emb.astype(np.float32, copy=False)


class BruteForceIndex(DenseIndex):
  """Exact dot-product search in NumPy: the reference the others are tested against."""
  kind = "brute"

  def knobs(self):
    """No constructor arguments."""
    return {}

  def _search_rows(self, queries, k):
    return exact_search(self._emb, self._check_queries(queries), k)


class ScannIndex(DenseIndex):
  """ScaNN over dot product, with automatic knobs for corpora of any size.

  Above `brute_force_below` rows: a k-means tree of `num_leaves` partitions
  (0 = round(sqrt(N))), asymmetric hashing with `dimensions_per_block` and the
  anisotropic threshold, then exact reordering of the best `reorder_k`.
  `num_leaves_to_search` = 0 tunes it at build time: the smallest value, from
  num_leaves / 10 upwards in steps of x1.5, whose recall@10 reaches
  `recall_target` on up to 256 indexed rows used as queries (their own row left
  out) against exact search; all leaves if none does. Clustered real
  embeddings need few leaves; random vectors need most of them.
  NB: real queries are harder than these stand-ins, and the misses are not
  random: on cpkc (11.5k MiniLM embeddings, 107 leaves) a 0.95 target searched
  11 leaves and kept the gold passage in the top 3 for 75.0% of 200 dev
  questions against 79.5% for exact search; 0.99 searched 39 leaves and kept
  78.5%. Hence the default of 0.99.
  Below `brute_force_below` rows ScaNN scores all rows exactly
  (`score_brute_force`).

  A query whose searched leaves hold fewer than k rows (ScaNN pads with NaN) is
  answered exactly instead; so are all queries when k > reorder_k.
  """
  kind = "scann"

  def __init__(self, num_leaves: int = 0, num_leaves_to_search: int = 0,
               training_sample_size: int = 100_000, dimensions_per_block: int = 2,
               anisotropic_quantization_threshold: float = 0.2, reorder_k: int = 100,
               brute_force_below: int = 2_000, recall_target: float = 0.99,
               tuned_leaves_to_search: int = 0):
    super().__init__()
    self.num_leaves = num_leaves
    self.num_leaves_to_search = num_leaves_to_search
    self.training_sample_size = training_sample_size
    self.dimensions_per_block = dimensions_per_block
    self.anisotropic_quantization_threshold = anisotropic_quantization_threshold
    self.reorder_k = reorder_k
    self.brute_force_below = brute_force_below
    self.recall_target = recall_target
    # Set by the build (and restored by load); what search passes to ScaNN.
    self.tuned_leaves_to_search = tuned_leaves_to_search
    self._searcher = None

  @classmethod
  def from_config(cls, cfg) -> "ScannIndex":
    """From `config.retrieval.scann` (any mapping with the constructor's keys)."""
    keys = ("num_leaves", "num_leaves_to_search", "training_sample_size",
            "dimensions_per_block", "anisotropic_quantization_threshold", "reorder_k",
            "brute_force_below", "recall_target")
    return cls(**{k: cfg[k] for k in keys if k in cfg})

  def knobs(self):
    """The constructor arguments, tuned_leaves_to_search included, so `load`
    restores the built searcher's setting."""
    return {"num_leaves": self.num_leaves, "num_leaves_to_search": self.num_leaves_to_search,
            "training_sample_size": self.training_sample_size,
            "dimensions_per_block": self.dimensions_per_block,
            "anisotropic_quantization_threshold": self.anisotropic_quantization_threshold,
            "reorder_k": self.reorder_k, "brute_force_below": self.brute_force_below,
            "recall_target": self.recall_target,
            "tuned_leaves_to_search": self.tuned_leaves_to_search}

  @property
  def uses_tree(self) -> bool:
    """Whether the corpus is big enough (>= brute_force_below rows) for the
    partitioned ScaNN tree; below it ScaNN scores every row exactly."""
    return len(self._ids) >= self.brute_force_below

  def _rebuild(self):
    n = len(self._ids)
    self._searcher, self.tuned_leaves_to_search = None, 0
    if n == 0:
      return
    builder = scann_ops_pybind.builder(self._emb, 10, "dot_product")
    if not self.uses_tree:
      self._searcher = builder.score_brute_force().build()
      return
    leaves = self.num_leaves or max(2, round(math.sqrt(n)))
    leaves = min(leaves, n)
    start = self.num_leaves_to_search or max(1, math.ceil(leaves / 10))
    self._searcher = (
        builder.tree(num_leaves=leaves, num_leaves_to_search=min(start, leaves),
                     training_sample_size=min(self.training_sample_size, n))
        .score_ah(self.dimensions_per_block,
                  anisotropic_quantization_threshold=self.anisotropic_quantization_threshold)
        .reorder(self.reorder_k).build())
    if self.num_leaves_to_search:
      self.tuned_leaves_to_search = min(self.num_leaves_to_search, leaves)
    else:
      self.tuned_leaves_to_search = self._tune_leaves(start, leaves)

  def _tune_leaves(self, start: int, leaves: int, k: int = 10) -> int:
    """Smallest leaves_to_search (start, x1.5 ...) with recall@k >= recall_target."""
    n = len(self._ids)
    k = min(k, n - 1)
    rows = np.random.default_rng(0).choice(n, size=min(256, n), replace=False)
    queries = self._emb[rows]
    exact_rows, exact_scores = exact_search(self._emb, queries, k + 1)
    # The k-th best score over the other rows (the query's own row left out).
    kth = np.array([sc[r != own][k - 1] for sc, r, own in zip(exact_scores, exact_rows, rows)])
    kth = kth[:, None]
    tol = 1e-4 * np.maximum(1.0, np.abs(kth))
    cand = start
    while cand < leaves:
      found, scores = self._searcher.search_batched(
          queries, final_num_neighbors=k + 1,
          pre_reorder_num_neighbors=max(self.reorder_k, k + 1), leaves_to_search=cand)
      scores = np.where(found == rows[:, None], -np.inf, np.nan_to_num(scores, nan=-np.inf))
      hits = np.minimum((scores >= kth - tol).sum(1), k)
      if hits.mean() / k >= self.recall_target:
        return cand
      cand = max(cand + 1, math.ceil(cand * 1.5))
    return leaves

  def _search_rows(self, queries, k):
    q = self._check_queries(queries)
    if self.uses_tree and k > self.reorder_k:
      return exact_search(self._emb, q, k)
    kwargs = {}
    if self.uses_tree:
      kwargs = {"pre_reorder_num_neighbors": self.reorder_k,
                "leaves_to_search": self.tuned_leaves_to_search}
    rows, scores = self._searcher.search_batched(q, final_num_neighbors=k, **kwargs)
    rows, scores = rows.astype(np.int64), np.array(scores, np.float32)
    short = np.isnan(scores).any(axis=1)
    if short.any():
      rows[short], scores[short] = exact_search(self._emb, q[short], k)
    return rows, scores

  def _save_extra(self, directory):
    super()._save_extra(directory)
    sdir = directory / "scann"
    if sdir.exists():
      shutil.rmtree(sdir)
    if self._searcher is not None:
      sdir.mkdir()
      self._searcher.serialize(str(sdir), relative_path=True)

  def _load_extra(self, directory, ids):
    super()._load_extra(directory, ids)
    sdir = directory / "scann"
    if not ids:
      return
    assets = sdir / "scann_assets.pbtxt"
    if not assets.is_file():
      raise FileNotFoundError(f"{directory}: no serialised ScaNN searcher ({assets}).")
    # Not scann_ops_pybind.load_searcher: it would unpickle scann_docids.pkl.
    self._searcher = scann_ops_pybind.ScannSearcher(
        scann_ops_pybind.scann_pybind.ScannNumpy(str(sdir.resolve()), assets.read_text()))

