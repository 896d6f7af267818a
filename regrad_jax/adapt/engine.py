"""`ReGrad`: the user-facing query-time object (retrieve -> gather -> adapt -> answer).

  engine = ReGrad.load(workdir, config)
  results = engine.answer(["Who wrote ...?"], k=3)
  results[0].answer, results[0].doc_ids, results[0].scores

The retriever returns every query's top-k document ids; queries are then batched
by prompt length (model.sampling.generate_batched) and for each batch the bank
returns sum_k g_k per query (one batched TensorStore read) and one jitted call forms
theta_q = theta* - gamma * alpha (.) sum_k g_k for every query and decodes all of
them, each through its own adapter (online.generate_adapted). In "icl" mode the
passages are also placed in the prompt (ReGrad + ICL). Nothing is written to the
base weights or to theta*: answering is reversible by construction.

Knowledge. `load` opens WORKDIR's knowledge base (regrad_jax/kb.py) read-only:
the catalog's committed documents, their bank rows and the index of exactly
them; `inject` / `remove` then commit each change durably (bank rows, catalog,
index), validating everything before the first write. An engine built directly
from a bank and a retriever (the evaluation's) keeps its changes in memory,
with the same validation. Long documents are split into passages (`chunking`);
results name the documents, and `passage_ids` the passages retrieved.
"""
import dataclasses
import pathlib

import numpy as np

from regrad_jax import kb as kb_lib
from regrad_jax import prompts as prompts_lib
from regrad_jax.adapt import online
from regrad_jax.bank import bank as bank_lib
from regrad_jax.bank import pipeline
from regrad_jax.meta import state as state_lib
from regrad_jax.model import loaders
from regrad_jax.model import sampling


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

  Attributes:
    params, model_config, tokenizer: the frozen base model.
    theta, alpha, lora_config: the meta-learned state.
    bank: the Gradient Bank; retriever: the document index.
    texts: id -> text, by passage and by document id (ICL prompts, display).
    computer: computes gradients of injected documents.
    kb: the knowledge base changes are committed to (None: kept in memory).
    chunking: how injected long documents are stored (None: truncated to the
      computer's max_len, one passage per document, as the evaluation banks).
    config: the config, for rebuilding the index (knowledge-base engines).
  """

  def __init__(self, params, model_config, tokenizer, theta, alpha, lora_config,
               bank, retriever, texts: dict[str, str], computer, *, gamma=1.0,
               k=3, mode="blind", max_new_tokens=20, batch_size=16, kb=None,
               chunking: kb_lib.Chunking | None = None, config=None):
    self.params, self.model_config, self.tokenizer = params, model_config, tokenizer
    self.theta, self.alpha, self.lora_config = theta, alpha, lora_config
    self.bank, self.retriever, self.texts, self.computer = bank, retriever, texts, computer
    self.gamma, self.k, self.mode = float(gamma), int(k), mode
    self.max_new_tokens, self.batch_size = int(max_new_tokens), int(batch_size)
    self.kb, self.config = kb, config
    self.chunking = chunking or kb_lib.Chunking(mode="truncate", max_len=computer.max_len)
    self.doc_of = kb.doc_of() if kb is not None else {}  # Passage id -> document id.
    # {passage id: text sha} the index holds: in line with the catalog when loaded.
    self._indexed = kb.stamp()["text_shas"] if kb is not None else None

  @classmethod
  def load(cls, workdir, config) -> "ReGrad":
    """Opens WORKDIR's meta_state and knowledge base with the model named in
    config. Reads only: a missing or damaged knowledge base is an error saying
    what to run; a config contradicting the saved state (LoRA config, bank
    identity) is an error naming the field."""
    workdir = pathlib.Path(workdir)
    kb = kb_lib.KnowledgeBase.open(workdir, lock_timeout=config.bank.get("lock_timeout", 0.0))
    params, model_config, tokenizer = loaders.load_model(config.model)
    theta, alpha, lcfg = state_lib.load_for(config, workdir, params, tokenizer)
    kb_lib.check_config(config, model_config, lcfg)
    computer = pipeline.make_computer(config, params, model_config, tokenizer, theta, lcfg)
    kb.bank.check(identity=computer.identity, codec=computer.codec)
    a = config.adapt
    return cls(params, model_config, tokenizer, theta, alpha, lcfg, kb.bank,
               kb.retriever(config), kb.texts(), computer, gamma=a.gamma, k=a.k,
               mode=a.mode, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
               kb=kb, chunking=kb_lib.Chunking.from_config(config), config=config)

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
    texts = [prompts_lib.qa_prompt(
        q, self.tokenizer, [self.texts[i] for i in row] if mode == "icl" else None)
             for q, row in zip(questions, ids)]

    def run(tokens, mask, rows):  # Each query through its own adapter.
      grad_sums = self.bank.gather_sum([ids[r] for r in rows])
      return online.generate_adapted(
          self.params, self.theta, self.alpha, grad_sums, tokens, mask,
          np.float32(gamma), config=self.model_config, lora_config=self.lora_config,
          max_new_tokens=self.max_new_tokens)

    new = sampling.generate_batched(
        sampling.prompt_ids(self.tokenizer, texts), run, pad_id=self.tokenizer.pad_id,
        batch_size=self.batch_size, desc="answer", progress=progress)
    return [self._result(q, prompts_lib.extract_answer(self.tokenizer, self.tokenizer.decode(row)),
                         i, sc)
            for q, row, i, sc in zip(questions, new, ids, scores)]

  def _result(self, question, answer, passage_ids, scores) -> Result:
    """Maps retrieved passages back to their documents (best passage each)."""
    docs = {}
    for pid, score in zip(passage_ids, scores):
      docs.setdefault(self.doc_of.get(pid, pid), float(score))
    return Result(question, answer, tuple(docs), tuple(docs.values()), tuple(passage_ids))

  def inject(self, documents, progress: bool = False):
    """Adds new documents: their gradients to the bank, their text to the index.

    The weights are untouched: injection is a bank append, reversible by `remove`.
    Everything is validated first (ValueError / TypeError naming the document:
    types, empty or non-encodable texts, duplicate ids, ids already present).
    A long document becomes passages "<id>#0", ... (`chunking`). Returns the
    bank's BuildReport (refused: {passage id: why}, never committed).
    """
    pairs = bank_lib.validate_documents(documents)
    if self.kb is not None:
      report = self.kb.add(pairs, self.computer, self.chunking, new_only=True,
                           progress=progress)
      self._follow_kb()
      return report.bank or bank_lib.BuildReport()
    known = set(self.doc_of.values()) | set(self.bank.ids)
    present = [i for i, _ in pairs if i in known]
    if present:
      raise ValueError(f"documents already in the bank (remove them first): {present[:10]}")
    passages = {pid: (doc_id, t) for doc_id, text in pairs
                for pid, t in kb_lib.split_document(self.tokenizer, doc_id, text, self.chunking)}
    report = self.bank.append([(pid, t) for pid, (_, t) in passages.items()], self.computer,
                              progress=progress)
    refused = {passages[pid][0] for pid in report.refused}
    kept = [(pid, d, t) for pid, (d, t) in passages.items() if d not in refused]
    try:
      self.retriever.add([_Doc(pid, t) for pid, _, t in kept])
    except Exception:  # All or nothing: the bank rows go too.
      self.bank.delete([pid for pid, _, _ in kept if pid in self.bank])
      raise
    dropped = [pid for pid, (d, _) in passages.items() if d in refused and pid in self.bank]
    if dropped:  # A document is banked whole or not at all.
      self.bank.delete(dropped)
    self.texts.update({pid: t for pid, _, t in kept})
    self.texts.update({d: t for d, t in pairs if d not in refused})
    self.doc_of.update({pid: d for pid, d, _ in kept})
    return report

  def remove(self, ids: list[str]) -> None:
    """Withdraws documents (e.g. a recalled product): bank rows and index entries
    of all their passages. KeyError naming unknown ids, before any change."""
    if isinstance(ids, str) or not all(isinstance(i, str) for i in ids):
      raise TypeError("remove expects a list of str document ids")
    if self.kb is not None:
      self.kb.remove(ids)
      self._follow_kb()
      return
    owned = {i: [p for p, d in self.doc_of.items() if d == i] or [i] for i in ids}
    indexed = set(self.retriever.ids)
    unknown = [i for i, ps in owned.items()
               if not all(p in self.bank and p in indexed for p in ps)]
    if unknown:
      raise KeyError(f"documents not in both the bank and the index: {unknown[:10]}")
    pids = [p for ps in owned.values() for p in ps]
    self.bank.delete(pids)
    self.retriever.remove(pids)
    for i in pids + list(ids):
      self.texts.pop(i, None)
      self.doc_of.pop(i, None)

  def _follow_kb(self) -> None:
    """After a knowledge-base commit: the index follows the catalog (updated in
    memory, then saved stamped with it), and so do texts and passage owners."""
    kb = self.kb
    if self.retriever is None:
      self.retriever = kb.retriever(self.config)
    else:
      self.retriever = kb.sync(self.retriever, self._indexed)
    kb.save_index(self.retriever)
    self._indexed = kb.stamp()["text_shas"]
    self.texts, self.doc_of = kb.texts(), kb.doc_of()


@dataclasses.dataclass(frozen=True)
class _Doc:
  id: str
  text: str
