"""Instruction CPT (the reference's baseline): CPT on the documents mixed with QA pairs.

Continued training on the knowledge-base documents, as a stream exactly as CPT
(baselines/cpt.py: same tokenisation, optimiser, learning rate, epochs, batch
size and loop), with training QA pairs interleaved: after each document come
config.eval.icpt_qa_per_doc QA pairs (prompt + answer + EOS, closed-book
prompt, prompts.encode_qa), taken in turn from the meta-state's training
questions in meta-training order (finetuned.training_records / task_order),
cycling. Documents keep their next-token loss; a QA pair's loss is on its answer
tokens only (prompt masked, as meta-training and the fine-tuned baselines), so
the model learns the answer format while it learns the documents, and answers
closed-book.

Full weights by default (method "icpt"; "icpt_lora": the config.lora layout),
and its drift is measured on the trained weights, like CPT's. Items are padded
to a length of data.doc_buckets + data.qa_buckets (one jitted step per length).
"""
from typing import Sequence

from regrad_jax import batching
from regrad_jax import prompts
from regrad_jax.baselines import cpt
from regrad_jax.baselines import finetuned


def qa_items(tokenizer, records) -> list[tuple[list[int], int]]:
  """(prompt + answer + EOS ids, prompt length) of each record's first answer."""
  return [prompts.encode_qa(tokenizer, r.question, r.answers[0]) for r in records]


def item_batches(items: Sequence[tuple[Sequence[int], int]], batch_size: int,
                 buckets, pad_id: int):
  """Yields (tokens, mask, target) batches of `batch_size` rows, in item order.

  items: (ids, n_target_from): tokens from position n_target_from on are
  predicted (0 for a document: every token after the first). A short last batch
  is completed with empty rows (no loss).
  """
  for i in range(0, len(items), batch_size):
    chunk = list(items[i:i + batch_size])
    longest = max(len(ids) for ids, _ in chunk)
    length = batching.bucket(longest, buckets)
    if longest > length:
      raise ValueError(f"an Instruction CPT item of {longest} tokens exceeds the "
                       f"largest bucket {length}: raise config.data.qa_buckets")
    seqs = [list(ids) for ids, _ in chunk] + [[]] * (batch_size - len(chunk))
    tokens, mask = batching.pad(seqs, length, pad_id)
    target = mask.copy()
    for row, (_, start) in enumerate(chunk):
      target[row, :start] = False
    yield tokens, mask, target


class ICPT(cpt.CPT):
  """Instruction CPT on a stream of documents (see the module docstring).

  Args:
    model, config, lora: as CPT; also reads
      eval.icpt_qa_per_doc and the meta-state's training questions
      (finetuned.training_records, eval.ft_steps / ft_batch_size budget).
    qa_records: the QA pairs to mix in (default: those training questions).
  Attributes:
    qa_used: QA pairs trained on so far.
  """

  def __init__(self, model, config, *, lora: bool = False, qa_records=None):
    super().__init__(model, config, lora=lora)
    self.name = "icpt_lora" if self.use_lora else "icpt"
    self.qa_per_doc = int(config.eval.icpt_qa_per_doc)
    if self.qa_per_doc < 0:
      raise ValueError(f"eval.icpt_qa_per_doc must be >= 0, got {self.qa_per_doc}")
    if qa_records is None:
      records, sizes = finetuned.training_records(config)
      order = finetuned.task_order(config, sizes).ravel()
      qa_records = [records[i] for i in order]
    if self.qa_per_doc and not qa_records:
      raise ValueError("Instruction CPT has no training QA pairs to mix in")
    self.qa = qa_items(model.tokenizer, qa_records)
    self.buckets = tuple(sorted(set(config.data.doc_buckets) |
                                set(config.data.qa_buckets)))
    self.qa_used = 0

  def inject(self, documents: Sequence) -> None:
    """Trains on the documents, each followed by icpt_qa_per_doc QA pairs."""
    if not documents:
      return
    docs = cpt.encode_documents(self.tokenizer, [d.text for d in documents],
                                self.max_len)
    items = []
    for ids in docs:
      items.append((ids, 0))
      for _ in range(self.qa_per_doc):
        items.append(self.qa[self.qa_used % len(self.qa)])
        self.qa_used += 1
    self.train_stream(lambda: item_batches(items, self.batch_size, self.buckets,
                                           self.tokenizer.pad_id),
                      -(-len(items) // self.batch_size))
