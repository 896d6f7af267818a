"""benchmarks.suite --mode=quick: every figure runs (tiny model) and the report
holds every field the full suite reports, measured (finite numbers).

In the real suite for its cost (about 90 s of 2 cores): the default suite keeps
under 10 minutes."""
import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import suite
from tests.conftest import REPO

pytestmark = pytest.mark.real


def test_quick_suite_report_has_every_field(tmp_path):
  # One CPU device, as the benchmarks run (not the tests' 4 fake devices).
  env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=4", "")}
  proc = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--mode=quick",
                         f"--out={tmp_path}"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads((tmp_path / "suite.json").read_text())
  quick = suite.figures("quick", "W")
  assert set(report["figures"]) == set(quick)
  kinds = {kind for kind, _ in suite.figures("cpu", "W").values()}
  assert kinds <= {kind for kind, _ in quick.values()}  # Quick covers every kind.
  for name, fig in report["figures"].items():
    for field in suite.FIELDS[fig["kind"]] + ("wall_s", "cpu_s"):
      assert isinstance(fig[field], (int, float)) and math.isfinite(fig[field]), (name, field)
    assert fig["peak_rss_gb"] > 0.05
    runs = fig.get("runs_wall_s", [round(fig["wall_s"], 2)])  # Repeated: the median run.
    assert len(runs) == suite.REPEATS.get(name, 1) and round(fig["wall_s"], 2) in runs
    if fig["kind"] in suite.PRIMED:  # The untimed first run's figures, kept beside.
      assert fig["cold_wall_s"] > 0 and fig["cold_peak_rss_gb"] > 0.05, name
  assert (tmp_path / "suite.md").read_text().count("\n| ") == len(quick) + 1
