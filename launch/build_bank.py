r"""Builds (or resumes) the Gradient Bank of the config's corpus in WORKDIR/bank.

  python -m launch.build_bank --config=configs/tiny.py --workdir=/tmp/regrad_tiny

Needs WORKDIR/meta_state (launch.meta_train) or config.meta.init_from. Killed, it
resumes where it stopped; run again after the corpus grew, it adds the new rows.
"""
from absl import app, flags
from ml_collections import config_flags

from regrad_jax import parallel
from regrad_jax.bank import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv):
  del argv
  parallel.maybe_initialize_distributed(_CONFIG.value.distributed)
  bank, report = pipeline.build_from_config(_CONFIG.value, _WORKDIR.value)
  if parallel.is_chief():
    size = bank.size_bytes()
    print(f"bank {bank.path}: {len(bank)} documents ({report.computed} computed now, "
          f"{report.docs_per_s:.2f} docs/s, {report.truncated} truncated, "
          f"{len(report.refused)} refused), codec {bank.codec.to_dict()}, "
          f"{_mb(size)} on disk ({_mb(size / max(bank.num_rows, 1))} per row)")


def _mb(n: float) -> str:
  return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


if __name__ == "__main__":
  app.run(main)
