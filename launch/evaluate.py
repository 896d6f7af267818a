r"""Evaluates every method of config.eval.methods; writes WORKDIR/results.json.

  python -m launch.evaluate --config=configs/tiny.py --workdir=/tmp/regrad_tiny
  python -m launch.evaluate --config=configs/tiny.py --workdir=/tmp/regrad_tiny \
      --experiment=injection   # WORKDIR/injection/{curve.json,table.md,curve.png}
"""
from absl import app, flags, logging
from ml_collections import config_flags

from regrad_jax import parallel
from regrad_jax.eval import evaluate, injection, report

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_EXPERIMENT = flags.DEFINE_enum("experiment", "main", ["main", "injection"],
                                "main: one evaluation; injection: sequential injection.")


def main(argv):
  del argv
  parallel.maybe_initialize_distributed(_CONFIG.value.distributed)
  if not flags.FLAGS["verbosity"].present:  # Progress bars, not library INFO logs.
    logging.set_verbosity(logging.WARNING)
  if _EXPERIMENT.value == "injection":
    print(report.injection_table(injection.run(_CONFIG.value, _WORKDIR.value)))
  else:
    print(report.results_table(evaluate.run(_CONFIG.value, _WORKDIR.value)["methods"]))


if __name__ == "__main__":
  app.run(main)
