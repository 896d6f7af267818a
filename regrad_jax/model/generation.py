"""Batched generation around `decode.generate`: the one length-bucketed batch loop, text in,
text out (greedy decoding and temperature sampling live in decode.py).

`generate_batched` is the loop every caller that decodes many prompts shares (the
baselines, drift probes, the ReGrad engine, `answer`): sort by length, cut into
fixed-size batches, left-pad each to a bucket, decode, restore the order. Its
shapes are what keeps jit from recompiling: at most len(buckets) per batch size.
"""
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from regrad_jax import batching
from regrad_jax import prompts as prompts_lib
from regrad_jax.model.decode import generate

# Padded prompt lengths in steps of x1.5 (x2 below 96), a few jit shapes for any
# prompt up to 4096 tokens, plus 160 and 640 where ReGrad's prompts fall: a cpkc
# question in SmolLM2's chat template is ~140 tokens (192 padded it by 36%), and
# ICL prompts with K=3 128-token passages ~530 (768: 45%). Each shape compiles
# once per machine (compile_cache.py).
PROMPT_BUCKETS = (32, 64, 96, 128, 160, 192, 256, 384, 512, 640, 768, 1024, 1536, 2048,
                  3072, 4096)


def prompt_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """Token ids of raw prompt texts (the tokenizer's default BOS); refuses none or
  an empty one."""
  if not texts:
    raise ValueError("no prompts given")
  ids = [tokenizer.encode(t, add_bos=tokenizer.add_bos_default) for t in texts]
  if not all(ids):
    raise ValueError("a prompt encodes to zero tokens; give some text")
  return ids


def encode_prompts(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """Tokenises and left-pads texts to one bucket length.

  Returns:
    tokens (B, P) int32 and mask (B, P) bool, P from PROMPT_BUCKETS; prompts
    longer than the largest bucket keep their last tokens.
  """
  ids = prompt_ids(tokenizer, texts)
  length = batching.bucket(max(map(len, ids)), PROMPT_BUCKETS)
  return batching.pad(ids, length, tokenizer.pad_id, left=True)


def batch_buckets(batch_size: int) -> tuple[int, ...]:
  """Padded row counts: 1, 2, 4, ... below batch_size, then batch_size."""
  return tuple(sorted({1 << i for i in range(batch_size.bit_length())
                       if 1 << i < batch_size} | {batch_size}))


def generate_batched(ids: Sequence[Sequence[int]], run: Callable, *, pad_id: int,
                     batch_size: int, buckets=PROMPT_BUCKETS, desc: str = "generate",
                     progress: bool = True) -> list[np.ndarray]:
  """New tokens for every prompt, `batch_size` rows per call, in a few shapes.

  Prompts are sorted by length and cut into batches of `batch_size` rows; a short
  last batch is padded (repeating its last prompt) to the next of
  `batch_buckets(batch_size)`, so one question decodes one row, not batch_size
  copies. Each batch is left-padded to the smallest of `buckets` that fits (a
  longer prompt keeps its last tokens): a jitted `run` sees few shapes.

  Args:
    ids: token ids per prompt.
    run: (tokens (B, P) int32, mask (B, P) bool, rows (B,) indices into ids,
      padding repeats included) -> (B, N) new token ids, B <= batch_size; e.g.
      `generate` with the rows' adapters.
    pad_id: the padding token.
    desc, progress: the progress bar's label, and whether to show it.
  Returns:
    (N,) int32 new tokens per prompt, in the order of ids.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  order = np.argsort([len(p) for p in ids], kind="stable")
  out = [None] * len(ids)
  for i in tqdm(range(0, len(order), batch_size), desc=desc, leave=False,
                disable=not progress):
    rows = order[i:i + batch_size]
    n = batching.bucket(len(rows), batch_buckets(batch_size))
    padded = np.concatenate([rows, np.repeat(rows[-1:], n - len(rows))])
    chunk = [ids[r] for r in padded]
    tokens, mask = batching.pad(chunk, batching.bucket(max(map(len, chunk)), buckets),
                                pad_id, left=True)
    new = np.asarray(run(tokens, mask, padded))
    for r, row in zip(rows, new):
      out[r] = row
  return out


def answer(params: dict, config, tokenizer, prompts: list[str],
           max_new_tokens: int = 20, chat: bool = False, *, lora=None,
           lora_config=None) -> list[str]:
  """Greedy continuations of a batch of prompts.

  Args:
    params, config: the base model (config: a ModelConfig).
    tokenizer: encodes prompts and decodes answers (text stops at EOS).
    prompts: raw texts, or questions when `chat` is set (formatted with
      prompts.qa_prompt: the chat template when the tokenizer has one).
    max_new_tokens: decoding budget per prompt.
    lora, lora_config: optional adapter (shared, or batched per prompt).
  Returns:
    One decoded continuation per prompt.
  """
  texts = [prompts_lib.qa_prompt(p, tokenizer) for p in prompts] if chat else list(prompts)
  ids = prompt_ids(tokenizer, texts)
  run = lambda tokens, mask, rows: generate(
      params, jnp.asarray(tokens), jnp.asarray(mask), config=config, lora=lora,
      lora_config=lora_config, max_new_tokens=max_new_tokens)
  out = generate_batched(ids, run, pad_id=tokenizer.pad_id, batch_size=len(ids),
                         progress=False)
  return [tokenizer.decode(row) for row in out]
