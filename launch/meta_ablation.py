r"""The meta-learning ablation on dev questions; writes WORKDIR/ablation.json.

  python -m launch.meta_ablation --config=configs/smollm2_cpkc.py:k=1,ctx=96 \
      --config.meta.init_from=regrad_jax/released/smollm2_135m_cpkc --workdir=/tmp/abl
"""
import json
import pathlib

from absl import app, flags
from ml_collections import config_flags

from regrad_jax.meta import ablation

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_NUM = flags.DEFINE_integer("num", 200, "Dev questions (per domain of a mixture).")
_ONLY = flags.DEFINE_list("only", [], "Conditions to run (default: all), e.g. "
                          "closed_book,regrad,rag.")


def main(argv):
  del argv
  rows = ablation.run(_CONFIG.value, _WORKDIR.value, num=_NUM.value,
                      only=tuple(_ONLY.value))
  path = pathlib.Path(_WORKDIR.value) / "ablation.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(rows, indent=2))
  print(ablation.table(rows))


if __name__ == "__main__":
  app.run(main)
