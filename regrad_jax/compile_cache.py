"""A persistent XLA compilation cache, on by default: compile once per machine.

Every program jitted by regrad_jax (the meta-step, the bank's gradient step, each
generation shape) is written to

  $REGRAD_XLA_CACHE, default $REGRAD_CACHE/xla (~/.cache/regrad_jax/xla)

and read back by later processes instead of being compiled again (JAX's own
persistent cache: entries are keyed by the program, the jax/jaxlib versions, the
backend and the compile options, so a stale entry is never used). A size limit
is set so that JAX guards reads and writes with a file lock (safe with several
processes sharing the folder) and evicts least-recently-used entries.

REGRAD_XLA_CACHE=0 (or off / false / no) turns it off. Settings made by the user
take precedence: JAX_COMPILATION_CACHE_DIR in the environment, or a cache folder
already set with jax.config.update before regrad_jax is imported.
"""
import os
import pathlib
import sys

_OFF = ("0", "off", "false", "no")
# Programs that compile faster than this are not worth a file (most tiny ones).
MIN_COMPILE_SECS = 0.1
MAX_BYTES = 4 << 30  # LRU eviction above 4 GiB; also what turns on JAX's file lock.


def cache_dir() -> pathlib.Path | None:
  """The folder used, or None when REGRAD_XLA_CACHE turns the cache off."""
  value = os.environ.get("REGRAD_XLA_CACHE", "")
  if value.lower() in _OFF:
    return None
  if value and value.lower() not in ("1", "on", "true", "yes"):
    return pathlib.Path(value).expanduser()
  from regrad_jax import registry
  return registry.cache_root() / "xla"


def configure() -> pathlib.Path | None:
  """Points JAX's persistent cache at `cache_dir()` unless the user chose one.

  Before JAX is imported this sets the JAX_* environment variables JAX reads at
  import (so importing regrad_jax does not import JAX); after, jax.config.
  Returns the folder in effect (None: off).
  """
  folder = cache_dir()
  if folder is None:
    return None
  settings = {"jax_compilation_cache_dir": str(folder),
              "jax_persistent_cache_min_compile_time_secs": MIN_COMPILE_SECS,
              "jax_compilation_cache_max_size": MAX_BYTES}
  if "jax" not in sys.modules:
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
      return pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    for name, value in settings.items():
      os.environ.setdefault(name.upper(), str(value))
    return folder
  import jax
  if jax.config.jax_compilation_cache_dir:
    return pathlib.Path(jax.config.jax_compilation_cache_dir)
  for name, value in settings.items():
    jax.config.update(name, value)
  return folder
