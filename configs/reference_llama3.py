"""The reference's protocol (Su et al., ReGrad) on Llama 3, in one flag.

  python -m launch.meta_train --config=configs/reference_llama3.py:variant=8b,path=/models/Llama-3.1-8B-Instruct \
      --config.data.name=2wiki --config.data.train=/data/2wiki/train.json ... --workdir=/ckpt/ref8b

Everything the paper fixes is set here (read from their code; ../shared/docs/METHOD.md):
the LoRA layout of each size (configs/llama3.py), K=3 passages per task taken as the
question's BM25 top-3 in rank order ("Passage 0: ..." first, gold not guaranteed),
their fixed Llama-3 prompt strings with "\n"-terminated answers and first-line
extraction, passages cut at 1,536 tokens in meta-training and 2,048 in the bank,
raw-text gradients stored in fp32, BM25 retrieval of K=3 at query time, AdamW 4e-4,
16 tasks a step, 10% warm-up from 0.01x, clip 0.5, bf16 compute. Our extensions
are then switched on one at a time and measured as deltas against this config,
e.g. --config.bank.codec=qzstd, --config.retrieval.backend=scann,
--config.meta.tasks=gold, --config.model.prompt_style=auto.

Options: variant=1b|3b|8b, path=FOLDER, steps (meta-steps; the paper trains one
epoch: ceil(training questions / 16)).
"""
from configs import common
from configs import llama3


def get_config(arg=None):
  opts = common.parse_arg(arg, "configs/reference_llama3.py", variant="8b", path="",
                          steps=1000)
  c = llama3.get_config(f"variant={opts.variant},path={opts.path}")
  c.model.prompt_style = "reference"
  c.model.max_seq_len = 8192
  c.data.max_context_len = 1536  # Meta-training passages.
  c.data.doc_buckets = (128, 256, 512, 1024, 1536, 2048)
  c.data.qa_buckets = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
  c.meta.k = 3
  c.meta.tasks = "reference"
  c.meta.mode = "blind"
  c.meta.alpha_mode = "tie"
  c.meta.alpha_init = 1e-2
  c.meta.lr = 4e-4
  c.meta.batch_size = 16
  c.meta.num_steps = opts.steps
  c.bank.codec = "fp32"
  c.bank.raw_text = True
  c.bank.max_context_len = 2048  # The bank reads longer passages than training.
  c.retrieval.backend = "bm25"
  c.adapt.k = 3
  c.adapt.max_new_tokens = 20
  return c
