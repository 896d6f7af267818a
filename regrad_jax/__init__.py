"""regrad_jax: Retrievable Gradients (ReGrad) in JAX/Flax."""
import pathlib

from regrad_jax import compile_cache as _compile_cache

_compile_cache.configure()  # Before anything is compiled (see compile_cache.py).


def released(name: str) -> pathlib.Path:
  """Path of a meta-learned state shipped with the package (regrad_jax/released)."""
  path = pathlib.Path(__file__).parent / "released" / name
  if not (path / "info.json").exists():
    raise FileNotFoundError(f"no released meta-learned state {name!r} at {path}")
  return path
