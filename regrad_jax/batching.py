"""Padding token sequences to a few fixed lengths, so jit compiles a handful of shapes."""
import numpy as np


def bucket(n: int, buckets) -> int:
  """The smallest bucket >= n (the largest one if n exceeds them all: callers
  truncate to max lengths first)."""
  for b in sorted(buckets):
    if n <= b:
      return int(b)
  return int(max(buckets))


def pad(seqs: list[list[int]], length: int, pad_id: int, left: bool = False
        ) -> tuple[np.ndarray, np.ndarray]:
  """(N, length) int32 tokens and bool mask; sequences longer than length are cut
  (keeping the end when left-padding, the start otherwise)."""
  tokens = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    s = list(s)[-length:] if left else list(s)[:length]
    sl = slice(length - len(s), length) if left else slice(0, len(s))
    tokens[i, sl], mask[i, sl] = s, True
  return tokens, mask
