"""Content fingerprints: what a bank or a meta-state was built from."""
import hashlib
import weakref

import jax
import numpy as np


# Fingerprints of trees of (immutable) jax.Arrays, by the identity of their leaves:
# a 540 MB model is hashed once per process, not once per component that checks it.
_KNOWN: dict[tuple, tuple[list, str]] = {}
_KNOWN_MAX = 32


def _identity(tree):
  """A key naming these very leaf objects, or None if any leaf may be mutated."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  if not leaves or not all(isinstance(x, jax.Array) for x in leaves):
    return None, leaves
  return (str(treedef), tuple(map(id, leaves))), leaves


def remember(tree, digest: str) -> None:
  """Records that `tree` (jax.Arrays) has fingerprint `digest` (e.g. one computed
  when the same bytes were written to a verified cache)."""
  key, leaves = _identity(tree)
  if key is None:
    return
  if len(_KNOWN) >= _KNOWN_MAX:  # Drop entries whose arrays are gone.
    for k in [k for k, (refs, _) in _KNOWN.items() if any(r() is None for r in refs)]:
      del _KNOWN[k]
  if len(_KNOWN) < _KNOWN_MAX:
    _KNOWN[key] = ([weakref.ref(x) for x in leaves], digest)


def tree_fingerprint(tree) -> str:
  """sha256 over a pytree's structure, leaf shapes, dtypes and bytes (16 hex chars).

  Hashes the float32 bytes of every leaf in flattening order: identical trees give
  identical fingerprints on any host; any changed value, shape or key changes it.
  A tree of the same jax.Array objects as an earlier call is not hashed again.
  """
  key, leaves = _identity(tree)
  if key is not None and key in _KNOWN:
    refs, digest = _KNOWN[key]
    if all(r() is x for r, x in zip(refs, leaves)):  # Not a reused id.
      return digest
  h = hashlib.sha256()
  paths, _ = jax.tree_util.tree_flatten_with_path(tree)
  h.update(str(jax.tree_util.tree_structure(tree)).encode())
  for path, leaf in paths:
    arr = np.asarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}{arr.shape}{arr.dtype}".encode())
    h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # No copy.
  digest = h.hexdigest()[:16]
  remember(tree, digest)
  return digest


def combine(**parts: str) -> str:
  """One fingerprint from named parts (order-independent)."""
  text = ";".join(f"{k}={parts[k]}" for k in sorted(parts))
  return hashlib.sha256(text.encode()).hexdigest()[:16]
