"""A general SmolLM2-135M meta-state: cpkc + squad mixed, K=3 passages of 128 tokens.

The general state `regrad_jax/released/smollm2_135m_general` (an interim one:
160 + 200 steps; its README gives the curves) came from

  python -m launch.meta_train --config=configs/smollm2_general.py:steps=280 \
      --config.meta.init_from=regrad_jax/released/smollm2_135m_cpkc --workdir=/tmp/general
  # stopped at step 160; then, from that state:
  python -m launch.meta_train --config=configs/smollm2_general.py:steps=200 \
      --config.meta.init_from=/tmp/general/checkpoints-160-state --config.meta.task_offset=160 \
      --config.meta.eval_every=100 --workdir=/tmp/general2

On 2 CPU cores a step of 4 K=3 x 128-token tasks took 22.7 s (median; measured
17-29 s on an otherwise idle machine), a dev evaluation (32 + 32 questions) about
5 minutes.

Each step draws its 4 tasks from cpkc (counterfactual "who" questions) and squad
(what / when / how many questions on Wikipedia paragraphs) with equal weight;
dev F1 is measured per domain and the checkpoint is chosen on their mean (on the
first 32 dev questions of each, which are then not the ones reported).
"""
from configs import common
from configs import smollm2_cpkc


def get_config(arg=None):
  opts = common.parse_arg(arg, "configs/smollm2_general.py", steps=1500, k=3, batch=4, ctx=128, lr=1e-3)
  c = smollm2_cpkc.get_config(f"steps={opts.steps},k={opts.k},batch={opts.batch},"
                              f"ctx={opts.ctx}")
  c.data.name = "cpkc+squad"
  c.data.weights = (0.5, 0.5)
  c.meta.lr = opts.lr
  c.meta.eval_every = 50
  c.meta.num_eval = 32  # Per domain.
  c.adapt.k = opts.k  # Served as trained.
  return c
