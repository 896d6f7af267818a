"""RAG: the top-K retrieved passages go into the prompt; the weights never change.

Uses the same retriever as ReGrad (same index, same K) and prompts.qa_prompt with
the retrieved passages, each cut to config.data.max_context_len tokens (the text
a banked gradient sees; prompts.truncate_text), so RAG and ReGrad differ only in
how a retrieved document reaches the model: as prompt text or as a step.
"""
from typing import Sequence

from regrad_jax import prompts
from regrad_jax.baselines import common


class RAG:
  """Retrieve-then-read with the base weights.

  Args:
    model: the base model (loaders.Model) (never modified).
    retriever: a retrieval.Retriever (`search(questions, k)` -> ids, scores;
      `add(documents)`; `ids`), possibly shared with the ReGrad engine.
    documents: the documents already in the retriever (their text is needed
      to build prompts); more arrive through `inject`.
    config: reads adapt.k, adapt.batch_size, adapt.max_new_tokens,
      data.max_context_len.
  """
  name = "rag"
  lora, lora_config = None, None  # The base weights (FineTunedRAG: a LoRA).

  def __init__(self, model, retriever, documents, config, *, k: int | None = None):
    self.params, self.model_cfg, self.tokenizer = model
    self.retriever = retriever
    self.k = int(config.adapt.k if k is None else k)
    self.batch_size = int(config.adapt.batch_size)
    self.max_new_tokens = int(config.adapt.max_new_tokens)
    self.max_context_len = int(config.data.max_context_len)
    self.text = {d.id: d.text for d in documents}
    self.last_doc_ids: list[list[str]] = []

  def inject(self, documents: Sequence) -> None:
    """Indexes documents the (possibly shared) retriever does not hold yet."""
    known = set(self.retriever.ids)
    new = [d for d in documents if d.id not in known]
    if new:
      self.retriever.add(new)
    self.text.update({d.id: d.text for d in documents})

  def retrieve(self, questions: Sequence[str]) -> list[list[str]]:
    ids, _ = self.retriever.search(list(questions), self.k)
    missing = {i for row in ids for i in row if i not in self.text}
    if missing:
      raise KeyError(f"the retriever returned {len(missing)} documents RAG has no "
                     f"text for, e.g. {sorted(missing)[:3]}: pass them in "
                     "`documents` or through inject()")
    return [list(row) for row in ids]

  def answer(self, questions: Sequence[str]) -> list[str]:
    self.last_doc_ids = self.retrieve(questions)
    passages = [[prompts.truncate_text(self.tokenizer, self.text[i], self.max_context_len)
                 for i in row] for row in self.last_doc_ids]
    ids = common.qa_prompt_ids(self.tokenizer, questions, passages)
    return common.generate_answers(
        self.params, ids, self.tokenizer, config=self.model_cfg,
        batch_size=self.batch_size,
        max_new_tokens=self.max_new_tokens, lora=self.lora,
        lora_config=self.lora_config, desc=self.name)

  def generic_params(self) -> dict:
    return self.params
