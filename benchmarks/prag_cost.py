r"""PRAG's cost per document: training its own LoRA vs one gradient of the document.

  python -m benchmarks.prag_cost --config=configs/smollm2_cpkc.py:k=1,ctx=96 \
      --config.data.root=../shared/data

PRAG (baselines/prag.py) trains config.eval.prag_steps AdamW steps per retrieved
document, config.eval.prag_batch_size documents per jitted call. The baseline,
measured in the same run on the same documents, is one gradient of their LM
loss w.r.t. the same adapters (about what a banked ReGrad gradient costs).
Prints seconds per document and what the documents of N questions would take.
"""
import functools

import jax
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common
from regrad_jax import data as data_lib
from regrad_jax.baselines import cpt, prag
from regrad_jax.model import loaders, lora as lora_lib, losses

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_cpkc.py:k=1,ctx=96")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (median).")
_QUESTIONS = flags.DEFINE_integer("questions", 200, "Questions to extrapolate to.")


def main(argv):
  del argv
  c = _CONFIG.value
  params, model_cfg, tok = loaders.load_model(c.model)
  n, ec = int(c.eval.prag_batch_size), c.eval
  docs, _ = data_lib.load_split(c, "test")
  ids = cpt.encode_documents(tok, [d.text for d in docs[:n]], c.data.max_context_len)
  tokens, mask = next(cpt.doc_batches(ids, n, c.data.doc_buckets, tok.pad_id))
  lcfg = lora_lib.LoraConfig(rank=int(ec.prag_rank), alpha=float(ec.prag_alpha), start=0,
                             stop=model_cfg.n_layers, targets=prag.TARGETS)
  init = lora_lib.init_lora(jax.random.key(0), model_cfg, lcfg)
  train = jax.jit(functools.partial(prag.train_adapters, config=model_cfg,
                                    lora_config=lcfg, lr=float(ec.prag_lr),
                                    steps=int(ec.prag_steps)))
  grad = jax.jit(jax.grad(lambda lora: losses.lm_loss(
      params, lora, tokens, mask, config=model_cfg, lora_config=lcfg).sum()))
  t_train = common.median_time(lambda: train(params, init, tokens, mask),
                               repeats=_REPEATS.value)
  t_grad = common.median_time(lambda: grad(init), repeats=_REPEATS.value)
  per_doc, k = t_train / n, int(c.adapt.k)
  print(f"{n} documents of {tokens.shape[1]} tokens, {ec.prag_steps} steps, rank "
        f"{ec.prag_rank}: PRAG {per_doc:.2f} s per document; one gradient "
        f"{t_grad / n:.3f} s per document (x{t_train / t_grad:.1f}); "
        f"{_QUESTIONS.value} questions x K={k}: <= {_QUESTIONS.value * k} documents, "
        f"<= {_QUESTIONS.value * k * per_doc / 60:.1f} min of adapter training")


if __name__ == "__main__":
  app.run(main)
