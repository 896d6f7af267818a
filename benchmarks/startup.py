r"""Start-up cost: loading the config's model (from the weights cache, or fresh).

  python -m benchmarks.startup [--config=configs/smollm2_cpkc.py] [--nocache]

Prints and (--json) reports the load time; with --nocache the GGUF is dequantised
again (REGRAD_WEIGHTS_CACHE=0 for this process), the cost every load paid before
model/weights_cache.py. launch.answer's cold and warm wall times are measured by
benchmarks.suite, which runs the CLI itself.
"""
import os
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_cpkc.py")
_CACHE = flags.DEFINE_bool("cache", True, "Use the dequantised-weights cache.")


def main(argv):
  del argv
  if not _CACHE.value:
    os.environ["REGRAD_WEIGHTS_CACHE"] = "0"
  from regrad_jax.model import loaders  # After the switch (read at load time anyway).
  t0 = time.perf_counter()
  params, _, _ = loaders.load_model(_CONFIG.value.model)
  jax.block_until_ready(params)
  load_s = time.perf_counter() - t0
  print(f"load_model ({_CONFIG.value.model.source}, weights cache "
        f"{'on' if _CACHE.value else 'off'}): {load_s:.2f} s, peak RSS "
        f"{common.peak_rss_gb():.2f} GB")
  common.emit(load_s=load_s, weights_cache=_CACHE.value)


if __name__ == "__main__":
  app.run(main)
