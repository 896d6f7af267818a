r"""Meta-learns theta*, alpha and writes them to WORKDIR/meta_state.

  python -m launch.meta_train --config=configs/tiny.py --workdir=/tmp/regrad_tiny
"""
from absl import app, flags
from ml_collections import config_flags

from regrad_jax import parallel
from regrad_jax.meta import trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv):
  del argv
  parallel.maybe_initialize_distributed(_CONFIG.value.distributed)
  summary = trainer.train(_CONFIG.value, _WORKDIR.value)
  print(f"meta-training done: last {summary['last']}, best dev F1 {summary['best_dev_f1']:.1f}")


if __name__ == "__main__":
  app.run(main)
