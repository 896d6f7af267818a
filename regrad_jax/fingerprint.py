"""Content fingerprints: what a bank or a meta-state was built from."""
import hashlib

import jax
import numpy as np


def tree_fingerprint(tree) -> str:
  """sha256 over a pytree's structure, leaf shapes, dtypes and bytes (16 hex chars).

  Hashes the float32 bytes of every leaf in flattening order: identical trees give
  identical fingerprints on any host; any changed value, shape or key changes it.
  """
  h = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  h.update(str(jax.tree_util.tree_structure(tree)).encode())
  for path, leaf in leaves:
    arr = np.asarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}{arr.shape}{arr.dtype}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()[:16]


def combine(**parts: str) -> str:
  """One fingerprint from named parts (order-independent)."""
  text = ";".join(f"{k}={parts[k]}" for k in sorted(parts))
  return hashlib.sha256(text.encode()).hexdigest()[:16]
