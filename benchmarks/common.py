"""Timing helpers shared by the benchmarks: medians of repeated, blocked calls."""
import statistics
import time

import jax


def median_time(fn, *, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time (s) of fn(), blocking on its JAX outputs; warmup calls
  (compilation) are excluded."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def peak_rss_gb() -> float:
  """Peak resident memory of this process so far, in GB (Linux ru_maxrss is KiB)."""
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
