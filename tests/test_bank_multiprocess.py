"""Two processes under jax.distributed build the same bank as one process."""
import json
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from regrad_jax import bank
from tests import _bank_worker as worker
from tests.conftest import REPO


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two(path, *extra) -> list[dict]:
  """Runs the worker as two jax.distributed processes; their JSON reports."""
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(REPO / "tests" / "_bank_worker.py"), "--bank", str(path),
       "--num_processes", "2", "--process_id", str(i), "--port", str(port), *extra],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO) for i in range(2)]
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=500)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("distributed bank build timed out")
    assert p.returncode == 0, err.decode()[-3000:]
    outs.append(json.loads(out.decode().strip().splitlines()[-1]))
  return outs


def test_two_processes_build_the_same_bank_as_one(tmp_path):
  path = tmp_path / "two"
  outs = _run_two(path)

  setup = worker.fixture()
  docs = setup[-1]
  # Each process computed its own contiguous share, together every document once.
  assert sorted(o["process"] for o in outs) == [0, 1]
  assert [o["computed"] for o in sorted(outs, key=lambda o: o["process"])] == [12, 12]
  assert all(o["ids"] == len(docs) for o in outs)

  computer = worker.make_computer(setup, devices=jax.devices()[:1])
  two = bank.Bank.open(path, identity=computer.identity, codec=computer.codec)
  one = bank.Bank.open_for(tmp_path / "one", computer)
  one.build(docs, computer)
  assert two.ids == one.ids == [d[0] for d in docs]
  np.testing.assert_array_equal(two.rows_of(two.ids), one.rows_of(one.ids))
  assert two.num_truncated == one.num_truncated > 0
  a, b = two.read_rows(two.rows_of(two.ids)), one.read_rows(one.rows_of(one.ids))
  for leaf in a:
    np.testing.assert_array_equal(a[leaf], b[leaf])
  assert not list((path / "commits").iterdir())  # The chief folded every marker.


def test_two_processes_commit_the_same_knowledge_base_as_one(tmp_path):
  """Chunked documents committed by two processes: the catalog and every row equal
  a one-process commit's."""
  from regrad_jax import kb
  outs = _run_two(tmp_path / "two" / "bank", "--kb")
  setup = worker.fixture()
  computer = worker.make_computer(setup, devices=jax.devices()[:1])
  one = kb.KnowledgeBase.open_for(tmp_path / "one", computer)
  one.add(setup[-1], computer, worker.kb_chunking())
  two = kb.KnowledgeBase.open(tmp_path / "two")
  assert sum(o["computed"] for o in outs) == len(one.bank.ids) > len(setup[-1])
  assert all(o["documents"] == len(setup[-1]) for o in outs)
  assert [(p.id, p.text, p.row, p.checksum) for p in two.passages] == [
      (p.id, p.text, p.row, p.checksum) for p in one.passages]
  a, b = (k.bank.read_rows(k.bank.rows_of(k.bank.ids)) for k in (two, one))
  for leaf in a:
    np.testing.assert_array_equal(a[leaf], b[leaf])
  assert kb.check(tmp_path / "two").damaged == []
