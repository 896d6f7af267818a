"""The main job (launch/quickstart.py): SmolLM2 + cpkc, ReGrad against its baselines.

Sized to finish in under 10 minutes on 2 CPU cores (8 min 25 s measured idle with
the model and data cached; CPT is 3 of them): 48 cpkc test questions whose
passages sit among 100 Wikipedia distractors, the released meta-learned state and
fine-tuned adapters, K=1 retrieved passage.

  python -m launch.quickstart --workdir=/tmp/regrad_quickstart
"""
import regrad_jax
from configs import common
from configs import smollm2_cpkc


def get_config(arg=None):
  common.parse_arg(arg, "configs/quickstart.py")  # No options: override fields.
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
  c.eval.methods = ("direct", "direct_ft", "rag", "rag_ft", "cpt", "regrad", "regrad_icl")
  # The fine-tuned baselines' released adapters: trained on the released state's
  # training questions and budget (regrad_jax/released/README.md).
  c.eval.rag_ft_from = str(regrad_jax.released("smollm2_135m_cpkc_rag_ft"))
  c.eval.direct_ft_from = str(regrad_jax.released("smollm2_135m_cpkc_direct_ft"))
  c.eval.num_probe = 100
  c.eval.num_ppl_docs = 16
  return c
