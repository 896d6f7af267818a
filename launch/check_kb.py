r"""Verifies a knowledge base (catalog, every bank row, index); --repair recomputes
damaged rows from their stored texts at the recorded theta*.

  python -m launch.check_kb --workdir=/tmp/regrad_tiny [--config=configs/tiny.py --repair]
"""
from absl import app, flags
from ml_collections import config_flags

from regrad_jax.bank import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory with kb.sqlite, bank, index.",
                               required=True)
_REPAIR = flags.DEFINE_bool("repair", False, "Recompute damaged rows, re-save the index.")


def main(argv):
  del argv
  report = pipeline.check_and_repair(_WORKDIR.value, _CONFIG.value if _REPAIR.value else None)
  print(report.summary())
  return 0 if report.ok else 1


if __name__ == "__main__":
  app.run(main)
