r"""One second-order meta-step: our trainer's step vs a bare hand-written one.

  python -m benchmarks.meta_step [--config=configs/smollm2_cpkc.py:k=3] [--tasks=4]

Both run the same tasks (k passages x Sd tokens, QA prompt Sq tokens) on the same
model in the same process. "ours" is trainer.make_step (shard_map over the data
axis, per-task scan with accumulated gradients, clipping, AdamW). "bare" is
jit(value_and_grad(loss)) of a hand-written inner/outer loss called once per task
from Python, with the gradients summed on the host side of the loop.
"""
import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common
from regrad_jax import data as data_lib, parallel
from regrad_jax.meta import objective, tasks as tasks_lib, trainer
from regrad_jax.model import LoraConfig, init_lora, loaders, losses, transformer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_cpkc.py:k=3")
_TASKS = flags.DEFINE_integer("tasks", 4, "Tasks per meta-step.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (median).")
_BARE = flags.DEFINE_bool("bare", True, "Also time the bare loop (off: the peak RSS "
                          "printed is the trainer step's alone).")


def bare_loss(meta, params, task, config, lcfg):
  """The method, written out directly: theta' = theta - alpha * sum_c grad L_LM."""
  def inner(theta):
    return jnp.sum(losses.lm_loss(params, theta, task["doc_tokens"], task["doc_mask"],
                                  config=config, lora_config=lcfg))
  g = jax.grad(inner)(meta["theta"])
  adapted = jax.tree.map(lambda t, a, x: t - a * x, meta["theta"], meta["alpha"], g)
  return losses.answer_loss(params, adapted, task["qa_tokens"][None],
                            task["qa_mask"][None], task["target_mask"][None],
                            config=config, lora_config=lcfg)[0]


def main(argv):
  del argv
  c = _CONFIG.value
  params, mcfg, tok = loaders.load_model(c.model)
  lcfg = LoraConfig.from_config(c.lora, mcfg)
  docs, recs = data_lib.load_split(c, "train")
  tasks = tasks_lib.build_tasks(recs[:_TASKS.value], docs, tok, k=c.meta.k, mode="blind",
                                max_context_len=c.data.max_context_len)
  # Every task padded to the largest buckets: both paths see identical shapes.
  batch = tasks_lib.collate(tasks, doc_buckets=(max(c.data.doc_buckets),),
                            qa_buckets=c.data.qa_buckets, pad_id=tok.pad_id)
  theta = init_lora(jax.random.key(0), mcfg, lcfg)
  theta = jax.tree.map(lambda x: x + 1e-3, theta)  # Nonzero B: realistic grads.
  meta = {"theta": theta, "alpha": objective.init_alpha(theta, "tie", 1e-2)}

  mc = ml_collections.ConfigDict(dict(lr=4e-4, warmup_frac=0.1, warmup_start_factor=0.01,
                                      weight_decay=0.01, clip_norm=0.5, alpha_mode="tie"))
  tx = trainer.make_optimizer(mc, 100)
  step = trainer.make_step(parallel.make_mesh(), tx, config=mcfg, lora_config=lcfg,
                           alpha_mode="tie", remat=c.meta.remat)
  opt = tx.init(meta)
  ours_first, ours = common.timed(lambda: step(meta, opt, params, batch)[2]["loss"],
                                  repeats=_REPEATS.value)
  shape = batch["doc_tokens"].shape
  figures = {"tasks": shape[0], "remat": transformer.remat_mode(c.meta.remat), "k": shape[1], "doc_len": shape[2],
             "qa_len": batch["qa_tokens"].shape[1], "step_s": ours,
             "task_s": ours / shape[0], "first_step_s": ours_first}
  if not _BARE.value:
    print(f"meta-step, {shape[0]} tasks x k={shape[1]} x {shape[2]} passage tokens: "
          f"{ours:.3f} s ({ours / shape[0]:.3f} s/task), first call {ours_first:.1f} s, "
          f"peak RSS {common.peak_rss_gb():.2f} GB")
    common.emit(**figures)
    return

  vg = jax.jit(jax.value_and_grad(bare_loss), static_argnums=(3, 4))
  per_task = [jax.tree.map(lambda x, i=i: x[i], batch) for i in range(len(tasks))]

  def bare():
    total = None
    for t in per_task:
      _, g = vg(meta, params, t, mcfg, lcfg)
      total = g if total is None else jax.tree.map(jnp.add, total, g)
    return total

  bare_s = common.median_time(bare, repeats=_REPEATS.value)
  common.emit(**figures, bare_step_s=bare_s)
  print(f"meta-step, {shape[0]} tasks x k={shape[1]} x {shape[2]} passage tokens, "
        f"QA {batch['qa_tokens'].shape[1]} tokens, {jax.device_count()} device(s)")
  print(f"  ours (trainer step):  {ours:.3f} s  ({ours / shape[0]:.3f} s/task)")
  print(f"  bare jitted loop:     {bare_s:.3f} s  ({bare_s / shape[0]:.3f} s/task)")
  print(f"  ratio bare/ours:      {bare_s / ours:.2f}x   peak RSS {common.peak_rss_gb():.2f} GB")


if __name__ == "__main__":
  app.run(main)
