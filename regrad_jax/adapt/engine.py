"""`ReGrad`: the user-facing query-time object (retrieve -> gather -> adapt -> answer).

  engine = ReGrad.load(workdir, config)        # serving: read-only
  results = engine.answer(["Who wrote ...?"], k=3)
  results[0].answer, results[0].doc_ids, results[0].scores
  engine = ReGrad.from_config(config, workdir, documents=docs)   # the evaluation's

The retriever returns every query's top-k document ids; queries are then batched
by prompt length (model.generation.generate_batched) and for each batch the bank
returns sum_k g_k per query (one batched TensorStore read) and one jitted call forms
theta_q = theta* - gamma * alpha (.) sum_k g_k for every query and decodes all of
them, each through its own adapter (online.generate_adapted). In "icl" mode the
passages are also placed in the prompt (ReGrad + ICL). Nothing is written to the
base weights or to theta*: answering is reversible by construction.

Knowledge. Every engine stands on a knowledge base (regrad_jax/kb.py), built by
`from_config` through bank/pipeline.open_knowledge, the sequence the bank build
shares. `load` opens WORKDIR's read-only: the catalog's committed documents,
their bank rows and the index of exactly them; `from_config(documents=...)`
first commits a corpus (the evaluation's). `inject` / `remove` commit each change
durably (bank rows, catalog, index), validating everything before the first
write. Long documents are split into passages (`chunking`); results name the
documents, and `passage_ids` the passages retrieved.
"""
import dataclasses

from absl import logging
import numpy as np

from regrad_jax import kb as kb_lib
from regrad_jax import prompts as prompts_lib
from regrad_jax.adapt import online
from regrad_jax.bank import bank as bank_lib
from regrad_jax.bank import pipeline
from regrad_jax.model import generation


@dataclasses.dataclass(frozen=True)
class Result:
  """One answered query."""
  question: str
  answer: str
  doc_ids: tuple[str, ...]  # Retrieved documents, best first (each once).
  scores: tuple[float, ...]  # Their retrieval scores (of their best passage).
  passage_ids: tuple[str, ...] = ()  # The retrieved passages, best first.


class ReGrad:
  """Answers questions with retrieved gradients (see module docstring).

  Build one with `ReGrad.from_config` (or `ReGrad.load`, read-only).

  Attributes:
    model: the frozen base model (loaders.Model: params, config, tokenizer).
    meta: the meta-learned state (meta.state.MetaState: theta, alpha, lora_config).
    kb: the knowledge base changes are committed to; bank: its Gradient Bank.
    retriever: the index of the knowledge base's passages.
    texts: id -> text, by passage and by document id (ICL prompts, display).
    computer: computes gradients of injected documents.
    chunking: how injected long documents are stored.
    gamma, k, mode, max_new_tokens, batch_size: serving defaults (config.adapt).
    icl_max_tokens: tokens of each passage an ICL prompt shows (as RAG's:
      config.data.max_context_len).
    config: the config, for rebuilding the index.
  """

  def __init__(self, model, meta, kb: kb_lib.KnowledgeBase, computer, config, *,
               retriever=None, chunking: kb_lib.Chunking | None = None):
    self.model, self.meta, self.kb, self.computer = model, meta, kb, computer
    self.config = config
    a = config.adapt
    self.gamma, self.k, self.mode = float(a.gamma), int(a.k), a.mode
    self.max_new_tokens, self.batch_size = int(a.max_new_tokens), int(a.batch_size)
    self.icl_max_tokens = int(config.data.max_context_len)
    self.chunking = chunking or kb_lib.Chunking.from_config(config)
    self.retriever = kb.retriever(config) if retriever is None else retriever
    self.texts, self.doc_of = kb.texts(), kb.doc_of()  # doc_of: passage -> document.
    # {passage id: text sha} the index holds: in line with the catalog when loaded.
    self._indexed = kb.stamp()["text_shas"]

  @classmethod
  def from_config(cls, config, workdir, *, model=None, documents=None,
                  chunking: kb_lib.Chunking | None = None, kb_dir=None,
                  progress: bool = False) -> "ReGrad":
    """The engine a config names, over WORKDIR's meta state and knowledge base.

    Args:
      workdir: where the meta state is found (config.meta.init_from, else
        WORKDIR/meta_state) and, unless kb_dir says otherwise, the knowledge base.
      model: the loaded model (None: loaded from config.model).
      documents: None opens the knowledge base read-only (it must exist; nothing
        is created). Otherwise the knowledge base is made to hold exactly these
        documents (objects with .id and .text): new ones committed (an interrupted
        build resumes), others removed, and its index saved.
      chunking: how `documents` and later injections are stored (default
        config.data.long_documents).
    Raises:
      FileNotFoundError: no state or (read-only) no knowledge base, saying what to run.
      ValueError: the config contradicts the saved state (LoRA config, bank
        identity), naming the field.
    """
    k = pipeline.open_knowledge(config, workdir, model=model, kb_dir=kb_dir,
                                writer=documents is not None)
    chunking = chunking or kb_lib.Chunking.from_config(config)
    retriever = None  # Read-only: the saved index, in line with the catalog.
    if documents is not None:
      documents = list(documents)
      report = k.kb.add(documents, k.computer, chunking, progress=progress)
      extra = sorted(set(k.kb.documents) - {d.id for d in documents})
      if extra:
        report.removed = k.kb.remove(extra).removed
      logging.info("knowledge base %s: %s", k.kb.workdir, report)
      retriever = k.kb.retriever(config)
      k.kb.save_index(retriever)
    return cls(k.model, k.meta, k.kb, k.computer, config, retriever=retriever,
               chunking=chunking)

  @classmethod
  def load(cls, workdir, config) -> "ReGrad":
    """`from_config` read-only: WORKDIR's meta state and knowledge base as they
    are (a missing or damaged knowledge base is an error saying what to run)."""
    return cls.from_config(config, workdir)

  @property
  def bank(self) -> bank_lib.Bank:
    return self.kb.bank

  def answer(self, questions: list[str], k: int | None = None,
             mode: str | None = None, gamma: float | None = None,
             progress: bool = False) -> list[Result]:
    """Answers each question with its own retrieved gradients.

    Args:
      questions: non-empty strings.
      k: documents per query (default self.k); an index with fewer documents
        than k gives all of them.
      mode: "blind" (default self.mode) or "icl" (passages also in the prompt).
      gamma: test-time step scale (default self.gamma); 0 = the unadapted theta*.
    """
    k = self.k if k is None else int(k)
    mode = self.mode if mode is None else mode
    gamma = self.gamma if gamma is None else float(gamma)
    if mode not in ("blind", "icl"):
      raise ValueError(f"mode must be 'blind' or 'icl', got {mode!r}")
    if isinstance(questions, str):
      raise TypeError("answer() takes a list of questions, not one string")
    if k < 1:
      raise ValueError(f"k must be >= 1, got {k}")
    if self.bank.num_rows == 0 or not self.bank.ids or self.retriever is None:
      raise ValueError("the Gradient Bank is empty: build it first")
    ids, scores = self.retriever.search(list(questions), k)
    missing = sorted({i for row in ids for i in row} - set(self.bank.ids))
    if missing:
      raise KeyError(f"retrieved ids have no gradient in the bank (index and bank "
                     f"out of sync; rebuild or inject them): {missing[:10]}")
    if not questions:
      return []
    tok, m = self.model.tokenizer, self.meta
    texts = self.prompts(questions, ids, mode)

    def run(tokens, mask, rows):  # Each query through its own adapter.
      grad_sums = self.bank.gather_sum([ids[r] for r in rows])
      return online.generate_adapted(
          self.model.params, m.theta, m.alpha, grad_sums, tokens, mask,
          np.float32(gamma), config=self.model.config, lora_config=m.lora_config,
          max_new_tokens=self.max_new_tokens)

    new = generation.generate_batched(
        generation.prompt_ids(tok, texts), run, pad_id=tok.pad_id,
        batch_size=self.batch_size, desc="answer", progress=progress)
    return [self._result(q, prompts_lib.extract_answer(tok, tok.decode(row)), i, sc)
            for q, row, i, sc in zip(questions, new, ids, scores)]

  def prompts(self, questions, ids, mode: str) -> list[str]:
    """The QA prompt of each question; in "icl" mode with its retrieved passages
    (ids: per question), each cut to icl_max_tokens tokens as RAG cuts them."""
    tok = self.model.tokenizer
    cut = lambda i: prompts_lib.truncate_text(tok, self.texts[i], self.icl_max_tokens)
    return [prompts_lib.qa_prompt(q, tok, [cut(i) for i in row] if mode == "icl" else None)
            for q, row in zip(questions, ids)]

  def _result(self, question, answer, passage_ids, scores) -> Result:
    """Maps retrieved passages back to their documents (best passage each)."""
    docs = {}
    for pid, score in zip(passage_ids, scores):
      docs.setdefault(self.doc_of.get(pid, pid), float(score))
    return Result(question, answer, tuple(docs), tuple(docs.values()), tuple(passage_ids))

  def inject(self, documents, progress: bool = False):
    """Adds new documents: their gradients to the bank, their text to the index,
    committed to the knowledge base.

    The weights are untouched: injection is a bank append, reversible by `remove`.
    Everything is validated first (ValueError / TypeError naming the document:
    types, empty or non-encodable texts, duplicate ids, ids already present).
    A long document becomes passages "<id>#0", ... (`chunking`). Returns the
    bank's BuildReport (refused: {passage id: why}, never committed).
    """
    report = self.kb.add(documents, self.computer, self.chunking, new_only=True,
                         progress=progress)
    self._follow_kb()
    return report.bank or bank_lib.BuildReport()

  def remove(self, ids: list[str]) -> None:
    """Withdraws documents (e.g. a recalled product): bank rows and index entries
    of all their passages. KeyError naming unknown ids, before any change."""
    if isinstance(ids, str) or not all(isinstance(i, str) for i in ids):
      raise TypeError("remove expects a list of str document ids")
    self.kb.remove(ids)
    self._follow_kb()

  def _follow_kb(self) -> None:
    """After a knowledge-base commit: the index follows the catalog (updated in
    memory, then saved stamped with it), and so do texts and passage owners."""
    kb = self.kb
    if self.retriever is None:  # The knowledge base was empty.
      self.retriever = kb.retriever(self.config)
    else:
      self.retriever = kb.sync(self.retriever, self._indexed)
    kb.save_index(self.retriever)
    self._indexed = kb.stamp()["text_shas"]
    self.texts, self.doc_of = kb.texts(), kb.doc_of()
