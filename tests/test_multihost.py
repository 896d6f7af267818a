"""Multi-host: two jax.distributed processes train like one process on 4 devices.

The two workers (2 fake CPU devices each) build one global 4-device mesh and run
`trainer.train` for 2 meta-steps (each meta-batch a global array, orbax
checkpoints and meta_state saved collectively, files by process 0, and a dev
evaluation with greedy answers at the end); a third, single process with 4 devices
runs the same. The meta states and dev figures must agree.

Also here: the library imports that the launches make must leave JAX's backend
uninitialised (jax.distributed.initialize() refuses to run after it), and the
multi-host launch scripts must parse.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import REPO

TIMEOUT_S = 240  # Per process; about 25 s of CPU each on an idle machine.


def _free_port() -> int:
  try:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      return s.getsockname()[1]
  except OSError as e:
    pytest.skip(f"cannot bind a local port for the coordinator: {e}")


def _env() -> dict:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # The worker sets its own device count.
  cache = jax.config.jax_compilation_cache_dir
  if cache:
    env["REGRAD_TEST_JAX_CACHE"] = cache
  return env


def _start(out, *args):
  return subprocess.Popen(
      [sys.executable, str(REPO / "tests" / "_multihost_worker.py"), "--out",
       str(out), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
      env=_env())


def _finish(procs) -> list[dict]:
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
        q.communicate()
      pytest.fail(f"a multi-host worker ran past {TIMEOUT_S} s")
    assert p.returncode == 0, err.decode()[-3000:]
    outs.append(json.loads(out.decode().strip().splitlines()[-1]))
  return outs


def _load(folder, prefix) -> list[np.ndarray]:
  return [np.load(f) for f in sorted(folder.glob(f"{prefix}_*.npy"))]


def test_two_processes_train_like_one(tmp_path):
  port = _free_port()
  # All three run at once: the single-process reference overlaps the pair.
  procs = [_start(tmp_path / "two", "--devices", "2", "--num_processes", "2",
                  "--process_id", str(i), "--port", str(port)) for i in range(2)]
  procs.append(_start(tmp_path / "one", "--devices", "4"))
  two0, two1, one = _finish(procs)

  assert [two0["process"], two1["process"]] == [0, 1]
  assert two0["processes"] == 2 and two0["devices"] == 4
  assert two0["local_devices"] == 2
  assert one["processes"] == 1 and one["devices"] == one["local_devices"] == 4

  p0, p1, ref = tmp_path / "two" / "p0", tmp_path / "two" / "p1", tmp_path / "one" / "p0"
  meta0, meta1, meta_ref = _load(p0, "meta"), _load(p1, "meta"), _load(ref, "meta")
  assert len(meta0) == len(meta_ref) > 0
  # Replicated outputs: both processes hold the very same state.
  for a, b in zip(meta0, meta1):
    np.testing.assert_array_equal(a, b)
  # Process 0 alone writes the log and info.json; both hold the checkpoints.
  work2, work1 = tmp_path / "two" / "workdir", tmp_path / "one" / "workdir"
  logs = [[json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()]
          for w in (work2, work1)]
  assert [m["step"] for m in logs[0]] == [1, 2]
  # Cross-process all-reduce may sum in another order than in-process: allclose.
  np.testing.assert_allclose([m["loss"] for m in logs[0]], [m["loss"] for m in logs[1]],
                             rtol=1e-5)
  dev2, dev1 = logs[0][-1]["dev"], logs[1][-1]["dev"]
  assert dev2["n"] == dev1["n"] == 4
  assert (dev2["em"], dev2["f1"]) == (dev1["em"], dev1["f1"])
  np.testing.assert_allclose(dev2["loss"], dev1["loss"], rtol=1e-5)
  assert json.loads((work2 / "meta_state" / "info.json").read_text())["step"] == 2
  assert sorted(int(p.name) for p in (work2 / "checkpoints").iterdir()
                if p.name.isdigit()) == [1, 2]
  for a, b in zip(meta0, meta_ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # The two steps moved every leaf (theta and alpha): the comparison has teeth.
  for before, after in zip(_load(ref, "init"), meta_ref):
    assert before.shape == after.shape and not np.allclose(before, after)


def test_launch_imports_leave_jax_uninitialised():
  """`--config.distributed=True` needs jax.distributed.initialize() to run first.

  Each launch imports the library at module level, then calls
  parallel.maybe_initialize_distributed in main(): no import may run a JAX
  computation (as a third-party module may do at import time).
  """
  launches = sorted(p.stem for p in (REPO / "launch").glob("*.py")
                    if p.stem != "__init__")
  # All launches in one process: each one's flags are dropped after its import
  # (they share names). On the first backend start, the import frames that led
  # to it (not JAX's own) are kept, so a failure names the culprit.
  code = f"""
import importlib, traceback
from absl import flags
from jax._src import xla_bridge
culprit = []
start = xla_bridge.backends
def backends(*a, **k):
  if not culprit:
    culprit.extend(f"{{f.filename}}:{{f.lineno}}" for f in traceback.extract_stack()
                   if "/jax/" not in f.filename and "<" not in f.filename)
  return start(*a, **k)
xla_bridge.backends = backends
for name in {launches!r}:
  importlib.import_module("launch." + name)
  assert not xla_bridge.backends_are_initialized(), (name, culprit)
  for flag in list(flags.FLAGS.flags_by_module_dict().get("launch." + name, [])):
    delattr(flags.FLAGS, flag.name)
"""
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(),
                     capture_output=True, timeout=120)
  assert r.returncode == 0, (
      "importing a launch initialises the JAX backend, so its "
      "--config.distributed=True would fail:\n" + r.stderr.decode()[-2000:])


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_multinode.sh"])
def test_launch_scripts_parse(script):
  path = REPO / "launch" / script
  r = subprocess.run(["bash", "-n", str(path)], capture_output=True, timeout=30)
  assert r.returncode == 0, r.stderr.decode()
  r = subprocess.run(["bash", str(path), "--help"], capture_output=True, timeout=30)
  assert r.returncode == 0 and b"Usage" in r.stdout, r.stderr.decode()
