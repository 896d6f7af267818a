"""Tests for regrad_jax.compile_cache: the persistent XLA cache, on by default.

Each case runs a fresh Python (the cache is configured when regrad_jax is first
imported), with REGRAD_XLA_CACHE pointed at a temp folder.
"""
import json
import os
import subprocess
import sys

from tests.conftest import REPO

# Compiles one program and reports the cache folder in effect and the cache hits.
_PROGRAM = """
import json, sys
if sys.argv[1] == "jax-first":
  import jax
import regrad_jax, jax, jax.numpy as jnp
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((8, 8), jnp.float32)).block_until_ready()
print(json.dumps({"dir": jax.config.jax_compilation_cache_dir, "hits": len(hits)}))
"""


def _run(tmp_path, value, order="regrad-first"):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION")}
  env.update(REGRAD_XLA_CACHE=value, JAX_PLATFORMS="cpu",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # Even tiny programs.
  out = subprocess.run([sys.executable, "-c", _PROGRAM, order], env=env, cwd=REPO,
                       capture_output=True, text=True, check=True, timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_programs_are_written_then_read_back(tmp_path):
  folder = tmp_path / "xla"
  first = _run(tmp_path, str(folder))
  assert first == {"dir": str(folder), "hits": 0}
  files = sorted(p.name for p in folder.glob("*-cache"))  # (+ "-atime" stamps)
  assert files  # The compiled program landed in the folder.
  second = _run(tmp_path, str(folder), order="jax-first")  # jax.config path.
  # Every program of the first run is read back, none compiled or written again.
  assert second == {"dir": str(folder), "hits": len(files)}
  assert sorted(p.name for p in folder.glob("*-cache")) == files


def test_cache_can_be_turned_off(tmp_path):
  for value in ("0", "off"):
    assert _run(tmp_path, value) == {"dir": None, "hits": 0}
  assert not any(tmp_path.iterdir())
