"""regrad_jax: Retrievable Gradients (ReGrad) in JAX/Flax."""
import pathlib

from regrad_jax import compile_cache as _compile_cache

_compile_cache.configure()  # Before anything is compiled (see compile_cache.py).


def released(name: str) -> pathlib.Path:
  """Path of a meta-learned state or fine-tuned baseline adapter shipped with the
  package (regrad_jax/released; its README has the command that made each)."""
  path = pathlib.Path(__file__).parent / "released" / name
  if not (path / "info.json").exists():
    raise FileNotFoundError(f"nothing released as {name!r} at {path}")
  return path
