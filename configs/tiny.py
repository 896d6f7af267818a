"""A random 4-layer model on a built-in synthetic corpus: every launch runs in seconds.

  python -m launch.meta_train --config=configs/tiny.py --workdir=/tmp/tiny
"""
from configs import common


def get_config(arg=None):
  opts = common.parse_arg(arg, "configs/tiny.py", steps=20)
  c = common.base()
  c.model.source = "tiny"
  c.model.max_seq_len = 256
  c.lora.rank = 4
  c.lora.alpha = 8.0  # Upper half of the 4 layers: (2, 4).
  c.data.name = "tiny"
  c.data.max_context_len = 96
  c.data.doc_buckets = (64, 96)
  c.data.qa_buckets = (64, 128, 256, 384)  # 384: ICL prompts with k=2 passages.
  c.meta.k = 2
  c.meta.batch_size = 4
  c.meta.num_steps = opts.steps
  c.meta.eval_every = 10
  c.meta.num_eval = 8
  c.meta.checkpoint_every = 5
  c.meta.lr = 3e-3
  c.meta.alpha_init = 0.5
  c.bank.batch_size = 4
  c.retrieval.encoder = "tiny"
  c.adapt.max_new_tokens = 8
  c.adapt.batch_size = 4
  c.eval.num_questions = 8
  c.eval.increments = (4, 8)
  c.eval.num_probe = 8
  c.eval.num_ppl_docs = 4
  return c
