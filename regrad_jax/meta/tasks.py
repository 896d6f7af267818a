"""Meta-learning tasks (C, q, a): k passages for a question, and its answer.

Two ways to pick the k passages (config.meta.tasks):
  "gold"       the gold passage plus its question's k-1 best other BM25 hits, in a
               seeded random order (the gold passage is always in, not always first);
  "reference"  the question's BM25 top-k in rank order, as the reference trains
               (the gold passage is not guaranteed to be among them).
Passages are numbered from prompts.first_index ("Passage 1: ..." or, in the
reference prompt style, "Passage 0: ...").

Each passage is its document's first max_context_len tokens, except that with
config.meta.passages="answer_chunk" ("gold" selection) a gold document whose
first tokens lack the answer is represented by the passage the bank would store
that holds it (kb.split_document's chunks): 40% of squad training answers lie
beyond a paragraph's first 128 tokens, where a truncated gold passage asks the
state to answer from a gradient that never saw the answer.

A task holds, as padded NumPy arrays:
  doc_tokens  (k, Sd) int32 / doc_mask (k, Sd) bool   the passages, "Passage i: ..."
  qa_tokens   (Sq,)   int32 / qa_mask  (Sq,)   bool   prompt + answer + EOS
  target_mask (Sq,)   bool   True on answer tokens (the only ones the QA loss sees)
Sd and Sq are chosen from config.data.doc_buckets / qa_buckets, so a meta-batch has
one of a handful of shapes.
"""
import dataclasses

import numpy as np

from regrad_jax import batching
from regrad_jax import data as data_lib
from regrad_jax import prompts
from regrad_jax.retrieval import bm25


@dataclasses.dataclass(frozen=True)
class Task:
  """One meta-learning task, unpadded (`collate` pads tasks into arrays).

  Attributes:
    id: the QA record's id.
    question: the question text.
    answers: gold answers; answers[0] is the one in qa_ids.
    passages: k raw passage texts, in task order (see the module docstring).
    doc_ids: k token-id lists (each <= max_context_len ids) of
      "Passage i: <text>", in the order of `passages`; padded to (k, Sd).
    qa_ids: token ids of prompt + answer + EOS (the prompt holds the passages
      in "icl" mode); padded to (Sq,).
    n_prompt: number of prompt tokens at the start of qa_ids; the rest are the
      answer tokens the QA loss sees.
  """
  id: str
  question: str
  answers: tuple[str, ...]
  passages: tuple[str, ...]  # Raw passage texts, in task order.
  doc_ids: list[list[int]]  # Token ids per passage (truncated, unpadded).
  qa_ids: list[int]  # Prompt + answer + EOS.
  n_prompt: int  # Prompt length within qa_ids.


SELECTIONS = ("gold", "reference")
PASSAGES = ("first", "answer_chunk")


def answer_passage(tokenizer, doc_id: str, text: str, answers, chunking) -> str:
  """The text that represents a gold document of `answers` in a task: its first
  chunking.max_len tokens if they hold an answer (case-insensitive), else the
  first of its banked chunks that does, else the first tokens."""
  from regrad_jax import kb as kb_lib  # pylint: disable=g-import-not-at-top
  has = lambda t: any(a.lower() in t.lower() for a in answers)
  head = prompts.truncate_text(tokenizer, text, chunking.max_len)
  if has(head):
    return text
  hits = [t for _, t in kb_lib.split_document(tokenizer, doc_id, text, chunking) if has(t)]
  return hits[0] if hits else text


def build_tasks(records, documents, tokenizer, *, k: int, mode: str,
                max_context_len: int, seed: int = 0, selection: str = "gold",
                chunking=None) -> list[Task]:
  """Turns QA records into tasks.

  Args:
    records: QARecords; for "gold", passage_id names their gold document.
    documents: the corpus the gold passages and the neighbours come from.
    tokenizer: the model's tokenizer.
    k: passages per task.
    mode: "blind" (QA prompt without passages) or "icl" (passages in the prompt).
    max_context_len: passage truncation in tokens.
    seed: seeds the per-task passage shuffle ("gold").
    selection: "gold" or "reference" (module docstring).
    chunking: a kb.Chunking: gold passages are the chunks holding the answer
      (answer_passage; "gold" selection only). None: first tokens.
  """
  if mode not in ("blind", "icl"):
    raise ValueError(f"mode must be 'blind' or 'icl', got {mode!r}")
  if selection not in SELECTIONS:
    raise ValueError(f"meta.tasks must be one of {SELECTIONS}, got {selection!r}")
  if chunking is not None and selection != "gold":
    raise ValueError("meta.passages='answer_chunk' needs meta.tasks='gold' (the "
                     "reference's BM25 top-k has no gold passage to choose a chunk of)")
  text = {d.id: d.text for d in documents}
  missing = [r.id for r in records if r.passage_id not in text]
  if missing and selection == "gold":
    raise ValueError(f"{len(missing)} records have no gold passage in the corpus, "
                     f"e.g. {missing[:3]}")
  gold = [r.passage_id for r in records] if selection == "gold" else None
  picks = bm25.neighbours(list(text), list(text.values()), [r.question for r in records], k,
                          gold)
  first = prompts.first_index(tokenizer)
  tasks = []
  for i, (r, ids) in enumerate(zip(records, picks)):
    if selection == "gold":  # Not always first: a seeded order per task.
      ids = [ids[j] for j in np.random.default_rng([seed, i]).permutation(len(ids))]
    passages = tuple(text[h] if chunking is None or h != r.passage_id else
                     answer_passage(tokenizer, h, text[h], r.answers, chunking)
                     for h in ids)
    doc_ids = [prompts.encode_document(tokenizer, p, max_context_len, index=n + first)[0]
               for n, p in enumerate(passages)]
    # ICL prompts hold each passage cut as its gradient sees it (as RAG does).
    in_prompt = [prompts.truncate_text(tokenizer, p, max_context_len) for p in passages]
    qa_ids, n_prompt = prompts.encode_qa(
        tokenizer, r.question, r.answers[0], in_prompt if mode == "icl" else None)
    tasks.append(Task(r.id, r.question, tuple(r.answers), passages, doc_ids,
                      qa_ids, n_prompt))
  return tasks


def split_tasks(config, split: str, tokenizer, *, start: int = 0, num: int = -1,
                **task_kw) -> dict[str, list[Task]]:
  """{domain: tasks} of a config's split: records start .. start+num (-1 = all)
  of each domain (data.domains), with BM25 neighbours from that domain's own
  passages. Held-out evaluation passes start = the questions the trainer
  selected its checkpoint on (config.meta.num_eval). Gold passages follow
  config.meta.passages (module docstring)."""
  passages = config.meta.get("passages", "first")
  if passages not in PASSAGES:
    raise ValueError(f"meta.passages must be one of {PASSAGES}, got {passages!r}")
  if passages == "answer_chunk":
    from regrad_jax import kb as kb_lib  # pylint: disable=g-import-not-at-top
    task_kw.setdefault("chunking", kb_lib.Chunking(
        "chunk", int(task_kw["max_context_len"]), int(config.data.get("chunk_overlap", 16))))
  docs, records = data_lib.load_split(config, split)
  out = {}
  for name in data_lib.domains(config):
    recs = [r for r in records if r.domain == name]
    gold = {r.passage_id for r in recs}
    own = docs if len(recs) == len(records) else [d for d in docs if d.id in gold]
    out[name] = build_tasks(recs[start:] if num < 0 else recs[start:start + num], own,
                            tokenizer, **task_kw)
  return out


def collate(tasks: list[Task], *, doc_buckets, qa_buckets, pad_id: int) -> dict:
  """Pads a list of tasks into one meta-batch of arrays.

  Returns a dict of NumPy arrays: doc_tokens/doc_mask (T, k, Sd),
  qa_tokens/qa_mask/target_mask (T, Sq). All tasks must have the same k.
  """
  ks = {len(t.doc_ids) for t in tasks}
  if len(ks) != 1:
    raise ValueError(f"tasks in a batch must have the same k, got {sorted(ks)}")
  longest_doc = max(len(d) for t in tasks for d in t.doc_ids)
  longest_qa = max(len(t.qa_ids) for t in tasks)
  if longest_doc > max(doc_buckets) or longest_qa > max(qa_buckets):
    raise ValueError(
        f"a task needs {longest_doc} passage / {longest_qa} QA tokens but the "
        f"largest buckets are {max(doc_buckets)} / {max(qa_buckets)}: raise "
        "config.data.doc_buckets / qa_buckets (ICL prompts hold k passages)")
  sd = batching.bucket(longest_doc, doc_buckets)
  sq = batching.bucket(longest_qa, qa_buckets)
  docs = [batching.pad(t.doc_ids, sd, pad_id) for t in tasks]
  qa_tokens, qa_mask = batching.pad([t.qa_ids for t in tasks], sq, pad_id)
  target = np.zeros_like(qa_mask)
  for i, t in enumerate(tasks):
    target[i, t.n_prompt:len(t.qa_ids)] = True
  target &= qa_mask  # Answers cut off by the bucket are not targets.
  return {"doc_tokens": np.stack([d[0] for d in docs]),
          "doc_mask": np.stack([d[1] for d in docs]),
          "qa_tokens": qa_tokens, "qa_mask": qa_mask, "target_mask": target}
