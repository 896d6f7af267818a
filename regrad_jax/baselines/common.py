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
from tqdm import tqdm

from regrad_jax import batching
from regrad_jax import prompts
from regrad_jax.model import sampling
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


def prompt_texts(tokenizer, documents, max_tokens: int) -> dict[str, str]:
  """id -> the document's text as placed in prompts (`prompts.truncate_text`)."""
  return {d.id: prompts.truncate_text(tokenizer, d.text, max_tokens) for d in documents}


def generate_answers(params: dict, prompt_ids: Sequence[Sequence[int]], tokenizer, *,
                     config: ModelConfig, batch_size: int, max_new_tokens: int,
                     buckets=sampling.PROMPT_BUCKETS, lora: dict | None = None,
                     lora_config=None,
                     lora_for_rows: Callable[[np.ndarray], dict] | None = None,
                     desc: str = "answer") -> list[str]:
  """Greedy answers to prompts, `batch_size` rows per jitted call.

  Prompts are sorted by length, left-padded to the smallest of `buckets` that
  fits (default: the ReGrad engine's, model.sampling.PROMPT_BUCKETS, so every
  method sees its prompt padded alike; a longer prompt keeps its last tokens)
  and decoded together; a short last batch repeats its last row, so every call
  has one of len(buckets) shapes.

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
  order = np.argsort([len(p) for p in prompt_ids], kind="stable")
  out = [""] * len(prompt_ids)
  for i in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
    rows = order[i:i + batch_size]
    padded_rows = np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows))])
    chunk = [prompt_ids[r] for r in padded_rows]
    length = batching.bucket(max(map(len, chunk)), buckets)
    tokens, mask = batching.pad(chunk, length, tokenizer.pad_id, left=True)
    row_lora = lora if lora_for_rows is None else lora_for_rows(padded_rows)
    new = np.asarray(generate(
        params, tokens, mask, config=config, lora=row_lora,
        lora_config=lora_config if row_lora is not None else None,
        max_new_tokens=max_new_tokens))
    for r, row in zip(rows, new):
      out[r] = prompts.extract_answer(tokenizer, tokenizer.decode(row))
  return out
