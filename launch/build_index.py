r"""Indexes the knowledge base's committed passages (launch.build_bank, injections;
removed documents excluded) for retrieval; writes WORKDIR/index.

  python -m launch.build_index --config=configs/tiny.py --workdir=/tmp/regrad_tiny
"""
from absl import app, flags
from ml_collections import config_flags

from regrad_jax import retrieval

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv):
  del argv
  retriever = retrieval.build_and_save(_CONFIG.value, _WORKDIR.value)
  print(f"indexed {len(retriever)} documents ({retriever.index.kind}) in {_WORKDIR.value}/index")


if __name__ == "__main__":
  app.run(main)
