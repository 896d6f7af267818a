"""Timing helpers shared by the benchmarks: medians of repeated, blocked calls, and
the --json report that benchmarks.suite collects from each benchmark's process."""
import json
import pathlib
import statistics
import time

import jax
from absl import flags

_JSON = flags.DEFINE_string("json", "", "Also write this run's figures (and peak RSS) "
                            "as JSON to this file (benchmarks.suite reads it).")


def timed(fn, *, repeats: int = 5, warmup: int = 1) -> tuple[float, float]:
  """(seconds of the first call, median seconds of `repeats` later calls).

  The first call includes compilation (or a compilation-cache read); warmup-1
  further calls are run untimed. Every call blocks on fn()'s JAX outputs.
  """
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  for _ in range(warmup - 1):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times) if times else float("nan")


def median_time(fn, *, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time (s) of fn(), blocking on its JAX outputs; warmup calls
  (compilation) are excluded."""
  if warmup < 1:
    raise ValueError("median_time needs warmup >= 1 (the compiling call)")
  return timed(fn, repeats=repeats, warmup=warmup)[1]


def peak_rss_gb() -> float:
  """Peak resident memory of this process so far, in GB (Linux ru_maxrss is KiB)."""
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def emit(**figures) -> dict:
  """Adds peak_rss_gb and writes the figures to --json (when given); returns them."""
  figures = {**figures, "peak_rss_gb": peak_rss_gb()}
  if _JSON.value:
    pathlib.Path(_JSON.value).write_text(json.dumps(figures, indent=2, sort_keys=True))
  return figures
