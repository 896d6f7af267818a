"""`ReGrad`: the user-facing query-time object (retrieve -> gather -> adapt -> answer).

  engine = ReGrad.load(workdir, config)
  results = engine.answer(["Who wrote ...?"], k=3)
  results[0].answer, results[0].doc_ids, results[0].scores

For each batch of queries: the retriever returns the top-k document ids; the bank
returns sum_k g_k per query (one batched TensorStore read); one jitted call forms
theta_q = theta* - gamma * alpha (.) sum_k g_k for every query and decodes all of
them, each through its own adapter (online.generate_adapted). In "icl" mode the
passages are also placed in the prompt (ReGrad + ICL). Nothing is written to the
base weights or to theta*: answering is reversible by construction.
"""
import dataclasses
import pathlib

import numpy as np
from tqdm import tqdm

from regrad_jax import batching
from regrad_jax import prompts as prompts_lib
from regrad_jax.adapt import online
from regrad_jax.bank import bank as bank_lib
from regrad_jax.bank import pipeline
from regrad_jax.meta import state as state_lib
from regrad_jax.model import loaders
from regrad_jax.model import sampling
from regrad_jax.retrieval import retriever as retriever_lib


def batch_buckets(batch_size: int) -> tuple[int, ...]:
  """Padded query-batch sizes: 1, 2, 4, ... below batch_size, then batch_size."""
  return tuple(sorted({1 << i for i in range(batch_size.bit_length())
                       if 1 << i < batch_size} | {batch_size}))


@dataclasses.dataclass(frozen=True)
class Result:
  """One answered query."""
  question: str
  answer: str
  doc_ids: tuple[str, ...]  # Retrieved documents, best first.
  scores: tuple[float, ...]  # Their retrieval scores.


class ReGrad:
  """Answers questions with retrieved gradients (see module docstring).

  Attributes:
    params, model_config, tokenizer: the frozen base model.
    theta, alpha, lora_config: the meta-learned state.
    bank: the Gradient Bank; retriever: the document index.
    texts: id -> document text (for ICL prompts and for showing passages).
    computer: computes gradients of injected documents.
  """

  def __init__(self, params, model_config, tokenizer, theta, alpha, lora_config,
               bank, retriever, texts: dict[str, str], computer, *, gamma=1.0,
               k=3, mode="blind", max_new_tokens=20, batch_size=16):
    self.params, self.model_config, self.tokenizer = params, model_config, tokenizer
    self.theta, self.alpha, self.lora_config = theta, alpha, lora_config
    self.bank, self.retriever, self.texts, self.computer = bank, retriever, texts, computer
    self.gamma, self.k, self.mode = float(gamma), int(k), mode
    self.max_new_tokens, self.batch_size = int(max_new_tokens), int(batch_size)

  @classmethod
  def load(cls, workdir, config, documents=None) -> "ReGrad":
    """Opens WORKDIR/{meta_state,bank,index} with the model named in config.

    documents: the corpus texts (default: data.load_corpus for config.eval.split,
    the corpus launch.build_bank and launch.build_index used).
    """
    from regrad_jax import data  # The corpus is only needed for its texts.
    workdir = pathlib.Path(workdir)
    params, model_config, tokenizer = loaders.load_model(config.model)
    theta, alpha, lcfg = state_lib.load_for(config, workdir, params, tokenizer)
    computer = pipeline.make_computer(config, params, model_config, tokenizer, theta, lcfg)
    bank = bank_lib.Bank.open_for(workdir / "bank", computer)
    retriever = retriever_lib.Retriever.load(workdir / "index")
    if documents is None:
      documents = data.load_corpus(config, split=config.eval.split)
    texts = {d.id: d.text for d in documents}
    a = config.adapt
    return cls(params, model_config, tokenizer, theta, alpha, lcfg, bank, retriever,
               texts, computer, gamma=a.gamma, k=a.k, mode=a.mode,
               max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)

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
    if self.bank.num_rows == 0 or not self.bank.ids:
      raise ValueError("the Gradient Bank is empty: build it first")
    ids, scores = self.retriever.search(list(questions), k)
    missing = sorted({i for row in ids for i in row} - set(self.bank.ids))
    if missing:
      raise KeyError(f"retrieved ids have no gradient in the bank (index and bank "
                     f"out of sync; rebuild or inject them): {missing[:10]}")
    results = []
    steps = range(0, len(questions), self.batch_size)
    for s in tqdm(steps, desc="answer", disable=not progress):
      qs, qids = list(questions[s:s + self.batch_size]), ids[s:s + self.batch_size]
      answers = self._answer_batch(qs, qids, mode, gamma)
      results += [Result(q, a, tuple(i), tuple(float(x) for x in sc))
                  for q, a, i, sc in zip(qs, answers, qids, scores[s:s + len(qs)])]
    return results

  def _answer_batch(self, questions, ids_per_query, mode, gamma) -> list[str]:
    n = len(questions)
    # A few batch shapes (powers of two up to batch_size): one question decodes
    # one row, not batch_size copies of it. Padding repeats the last query.
    pad = batching.bucket(n, batch_buckets(self.batch_size)) - n
    questions = questions + [questions[-1]] * pad
    ids_per_query = list(ids_per_query) + [ids_per_query[-1]] * pad
    grad_sums = self.bank.gather_sum(ids_per_query)
    texts = [prompts_lib.qa_prompt(
        q, self.tokenizer, [self.texts[i] for i in ids] if mode == "icl" else None)
             for q, ids in zip(questions, ids_per_query)]
    tokens, mask = sampling.encode_prompts(self.tokenizer, texts)
    out = online.generate_adapted(
        self.params, self.theta, self.alpha, grad_sums, tokens, mask,
        np.float32(gamma), config=self.model_config, lora_config=self.lora_config,
        max_new_tokens=self.max_new_tokens)
    return [self.tokenizer.decode(row).strip() for row in np.asarray(out)[:n]]

  def inject(self, documents, progress: bool = False):
    """Adds new documents: their gradients to the bank, their text to the index.

    The weights are untouched: injection is a bank append, reversible by `remove`.
    Returns the bank's BuildReport.
    """
    documents = list(documents)
    report = self.bank.append(documents, self.computer, progress=progress)
    refused = set(getattr(report, "refused", {}) or {})
    kept = [d for d in documents if d.id not in refused]
    self.retriever.add(kept)
    self.texts.update({d.id: d.text for d in kept})
    return report

  def remove(self, ids: list[str]) -> None:
    """Withdraws documents (e.g. a recalled product): bank rows and index entries."""
    self.bank.delete(ids)
    self.retriever.remove(ids)
    for i in ids:
      self.texts.pop(i, None)
