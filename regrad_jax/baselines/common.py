"""What every baseline shares: batched greedy QA answering and the Method protocol.

Every method of the comparison is an object with

  name               a key of results.json ("direct", "rag", "cpt", ...)
  inject(documents)  take in new documents (the stream of the injection
                     experiment); retrieval methods index them, CPT trains on
                     them, Direct ignores them
  answer(questions)  -> list[str] greedy answers (<= max_new_tokens tokens)
  generic_params()   the base-layout weights that answer a query unrelated to
                     the injected documents: what drift is measured on

so that evaluate.py and injection.py treat Direct, RAG, CPT, PRAG and ReGrad the
same way. Prompts always come from prompts.encode_qa (the one prompt module).
"""
from typing import Callable, Protocol, Sequence

import numpy as np

from regrad_jax import prompts
from regrad_jax.model import generation
from regrad_jax.model.decode import generate
from regrad_jax.model.config import ModelConfig


class Method(Protocol):
  """The interface every compared method implements (see the module docstring).

  evaluate.py and injection.py drive Direct, RAG, CPT, PRAG and ReGrad only
  through it.

  Attributes:
    name: the method's key in results.json ("direct", "rag", "cpt", ...).
  """
  name: str

  def inject(self, documents: Sequence) -> None:
    """Takes in new documents (objects with .id and .text), as a stream.

    Retrieval methods index them, CPT trains on them, Direct ignores them.
    """
    ...

  def answer(self, questions: Sequence[str]) -> list[str]:
    """Greedy answers to `questions`, one str each, in order."""
    ...

  def generic_params(self) -> dict:
    """Base-layout weights that answer a query unrelated to the injected
    documents; drift is measured on them."""
    ...


def qa_prompt_ids(tokenizer, questions: Sequence[str],
                  passages: Sequence[Sequence[str]] | None = None) -> list[list[int]]:
  """Token ids of the QA prompts (closed-book, or with each question's passages)."""
  if passages is not None and len(passages) != len(questions):
    raise ValueError(f"{len(questions)} questions but {len(passages)} passage lists")
  return [prompts.encode_qa(tokenizer, q,
                            passages=None if passages is None else list(passages[i]))[0]
          for i, q in enumerate(questions)]


def generate_answers(params: dict, prompt_ids: Sequence[Sequence[int]], tokenizer, *,
                     config: ModelConfig, batch_size: int, max_new_tokens: int,
                     buckets=generation.PROMPT_BUCKETS, lora: dict | None = None,
                     lora_config=None,
                     lora_for_rows: Callable[[np.ndarray], dict] | None = None,
                     desc: str = "answer") -> list[str]:
  """Greedy answers to prompts, `batch_size` rows per jitted call.

  Batched by model.generation.generate_batched (sorted by length, a short last
  batch repeats its last row, left-padded to the smallest of `buckets` that
  fits); the default buckets are the ReGrad engine's, so every method sees its
  prompt padded alike.

  Args:
    params: base-layout weights.
    prompt_ids: token ids per prompt.
    lora / lora_config: an optional LoRA applied to every row.
    lora_for_rows: alternatively, rows -> a batched LoRA tree (leaves
      (n, batch_size, ...)) giving each row its own adapter; `rows` are the
      indices into prompt_ids of the batch (padded by repeating the last).
  Returns:
    Decoded answers (stripped), in the order of prompt_ids.
  """
  if lora is not None and lora_for_rows is not None:
    raise ValueError("pass lora or lora_for_rows, not both")

  def run(tokens, mask, rows):
    row_lora = lora if lora_for_rows is None else lora_for_rows(rows)
    return generate(params, tokens, mask, config=config, lora=row_lora,
                    lora_config=lora_config if row_lora is not None else None,
                    max_new_tokens=max_new_tokens)

  new = generation.generate_batched(prompt_ids, run, pad_id=tokenizer.pad_id,
                                    batch_size=batch_size, buckets=buckets, desc=desc)
  return [prompts.extract_answer(tokenizer, tokenizer.decode(row)) for row in new]
