"""Meta-learning SmolLM2-135M-Instruct on the cpkc training tasks (CPU-sized).

The reference trains 16 tasks per step for one epoch on a GPU. On 2 CPU cores a
second-order step costs about 1 s per K=1 x 64-token task, so `arg` picks the
budget, e.g.
  python -m launch.meta_train --config=configs/smollm2_cpkc.py:steps=300,k=1 \
      --workdir=/tmp/meta_smollm2
"""
from configs import common


def get_config(arg=None):
  opts = common.parse_arg(arg, "configs/smollm2_cpkc.py", steps=300, k=3, batch=4,
                          ctx=128, mode="blind")
  c = common.base()
  c.model.source = "smollm2_135m"
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.layers = (15, 30)  # Upper half of 30 layers.
  c.data.name = "cpkc"
  c.data.max_context_len = opts.ctx
  c.data.doc_buckets = tuple(b for b in (32, 64, 96, 128, 192, 256) if b <= opts.ctx)
  c.data.qa_buckets = (64, 96, 128, 192, 256, 384, 512)
  c.meta.k = opts.k
  c.meta.mode = opts.mode
  c.meta.batch_size = opts.batch
  c.meta.num_steps = opts.steps
  c.meta.eval_every = 100
  c.meta.num_eval = 48
  c.meta.checkpoint_every = 20
  return c
