"""Meta-training loop: AdamW on (theta, alpha), orbax checkpoints, dev evaluation.

One meta-step takes T tasks, splits them over the mesh's "data" axis (shard_map),
runs each device's tasks one after another with accumulated second-order
gradients, averages over devices, clips the global norm and applies AdamW with a
linear warm-up (from start_factor * lr) then linear decay to 0.

The batch for step s is a pure function of (seed, s), and the checkpoint holds
(step, meta, optimiser state), so an interrupted run resumed from its last
checkpoint reaches the same state as an uninterrupted one.
"""
import functools
import json
import pathlib
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from regrad_jax import data as data_lib
from regrad_jax import fingerprint
from regrad_jax import metrics
from regrad_jax import parallel
from regrad_jax import prompts
from regrad_jax.meta import objective
from regrad_jax.meta import state as state_lib
from regrad_jax.meta import tasks as tasks_lib
from regrad_jax.model import decode
from regrad_jax.model import generation
from regrad_jax.model import lora as lora_lib
from regrad_jax.model import loaders


def make_optimizer(mc, num_steps: int) -> optax.GradientTransformation:
  """Clip -> AdamW with warm-up/decay; alpha frozen in "fix" mode."""
  warm = max(1, int(round(mc.warmup_frac * num_steps)))
  schedule = optax.join_schedules(
      [optax.linear_schedule(mc.lr * mc.warmup_start_factor, mc.lr, warm),
       optax.linear_schedule(mc.lr, 0.0, max(1, num_steps - warm))], [warm])
  adamw = optax.adamw(schedule, weight_decay=mc.weight_decay)
  if mc.alpha_mode == "fix":
    labels = lambda meta: {"theta": jax.tree.map(lambda _: "train", meta["theta"]),
                           "alpha": jax.tree.map(lambda _: "frozen", meta["alpha"])}
    adamw = optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()},
                                  labels)
  return optax.chain(optax.clip_by_global_norm(mc.clip_norm), adamw)


def make_step(mesh, tx, **objective_kw):
  """jit(meta, opt_state, params, batch) -> (meta, opt_state, metrics).

  batch leaves (T, ...) with T divisible by the mesh's data axis; params and meta
  are replicated.
  """
  def local(meta, params, batch):
    loss, grads = objective.batch_loss_and_grad(meta, params, batch, **objective_kw)
    return (jax.lax.pmean(loss, parallel.DATA),
            jax.lax.pmean(grads, parallel.DATA))

  # NB: check_vma=False because the scan in batch_loss_and_grad starts from
  # replicated zeros and accumulates device-varying values; pmean makes the
  # outputs replicated again, as out_specs P() states.
  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(parallel.DATA)),
                          out_specs=(P(), P()), check_vma=False)

  @jax.jit
  def step(meta, opt_state, params, batch):
    loss, grads = sharded(meta, params, batch)
    updates, opt_state = tx.update(grads, opt_state, meta)
    return optax.apply_updates(meta, updates), opt_state, {
        "loss": loss, "grad_norm": optax.global_norm(grads)}

  return step


def batch_indices(seed: int, step: int, batch_size: int, sizes,
                  weights=None) -> np.ndarray:
  """Task indices of a step, a pure function of (seed, step).

  sizes: tasks per domain (an int: one domain); the returned indices run over
  the domains' tasks concatenated in that order. Each slot of the run draws its
  domain with probabilities `weights` (None: proportional to sizes; one domain
  always draws 0), then takes the next task of that domain's own epoch-wise
  permutations, so every domain is covered once per its epoch.
  """
  sizes = np.atleast_1d(np.asarray(sizes, np.int64))
  p = sizes / sizes.sum() if weights is None else np.asarray(weights, np.float64)
  first, last = step * batch_size, (step + 1) * batch_size
  if len(sizes) == 1:
    domain = np.zeros(last, np.int64)
  else:  # Blocks of draws: slot i's domain does not depend on the run's length.
    block = 4096
    draws = np.concatenate([np.random.default_rng([seed, 1, b]).random(block)
                            for b in range(-(-last // block))])[:last]
    domain = np.minimum(np.searchsorted(np.cumsum(p), draws, side="right"),
                        len(sizes) - 1)
  offset = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  # Slot i is the rank[i]-th slot (from 0) that drew its domain.
  rank = np.zeros(last, np.int64)
  for d in range(len(sizes)):
    hit = domain == d
    rank[hit] = np.arange(int(hit.sum()))
  out = []
  for i in range(first, last):
    d = domain[i]
    epoch, pos = divmod(int(rank[i]), int(sizes[d]))
    rng = np.random.default_rng([seed, epoch] if d == 0 else [seed, epoch, 1, int(d)])
    out.append(offset[d] + rng.permutation(int(sizes[d]))[pos])
  return np.asarray(out)


@functools.partial(jax.jit, static_argnames=("config", "lora_config",
                                             "max_new_tokens"))
def adapted_answers(params, meta, doc_tokens, doc_mask, prompt_tokens, prompt_mask,
                    *, config, lora_config, max_new_tokens=20):
  """Greedy answers of Q tasks, each with theta' from its own passages.

  doc_tokens/doc_mask: (Q, k, Sd); prompt_tokens/prompt_mask: (Q, P) (any padding).
  Returns (Q, max_new_tokens) int32.
  """
  grads = jax.vmap(lambda d, m: objective.inner_grad(
      params, meta["theta"], d, m, config=config, lora_config=lora_config))(
          doc_tokens, doc_mask)
  lora = objective.batched_adapt(meta["theta"], meta["alpha"], grads)
  return decode.generate(params, prompt_tokens, prompt_mask, config=config,
                               lora=lora, lora_config=lora_config,
                               max_new_tokens=max_new_tokens)


@functools.partial(jax.jit, static_argnames=("config", "lora_config"))
def task_losses(params, meta, batch, *, config, lora_config):
  """(T,) answer losses L_QA(theta - alpha * g) of a collated batch of T tasks."""
  return jax.lax.map(lambda task: objective.task_loss(
      meta, params, task, config=config, lora_config=lora_config), batch)


def evaluate(params, meta, tasks, tokenizer, *, config, lora_config, data_cfg,
             batch_size=8, max_new_tokens=20) -> dict:
  """EM/F1 (percent) of greedy answers after the task's inner update, and the
  mean answer loss (nats/token): a finer signal than F1 while answers are wrong.

  Answers are decoded in batches of `batch_size` tasks by
  generation.generate_batched (as every other decoder of the package); losses are
  taken over the same batches in task order, the last one padded by repetition.
  """
  collate = lambda rows: tasks_lib.collate(
      [tasks[r] for r in rows], doc_buckets=data_cfg.doc_buckets,
      qa_buckets=data_cfg.qa_buckets, pad_id=tokenizer.pad_id)

  def run(prompt, pmask, rows):
    b = collate(rows)
    return parallel.to_host(adapted_answers(
        params, meta, b["doc_tokens"], b["doc_mask"], prompt, pmask, config=config,
        lora_config=lora_config, max_new_tokens=max_new_tokens))

  out = generation.generate_batched([t.qa_ids[:t.n_prompt] for t in tasks], run,
                                    pad_id=tokenizer.pad_id, batch_size=batch_size,
                                    buckets=data_cfg.qa_buckets, progress=False)
  preds = [prompts.extract_answer(tokenizer, tokenizer.decode(row)) for row in out]
  task_loss = []
  for i in range(0, len(tasks), batch_size):
    rows = list(range(i, min(i + batch_size, len(tasks))))
    rows += [rows[-1]] * (batch_size - len(rows))  # One batch shape.
    task_loss += list(parallel.to_host(task_losses(
        params, meta, collate(rows), config=config, lora_config=lora_config)))
  return {**metrics.aggregate(preds, [t.answers for t in tasks]),
          "loss": float(np.mean(task_loss[:len(tasks)]))}


def evaluate_domains(params, meta, dev_tasks: dict, tokenizer, **kw) -> dict:
  """`evaluate` per domain; em/f1/loss at the top level are the domains' means
  (checkpoint selection weighs every domain equally), per domain under "domains"."""
  per = {name: evaluate(params, meta, tasks, tokenizer, **kw)
         for name, tasks in dev_tasks.items()}
  mean = {key: float(np.mean([d[key] for d in per.values()]))
          for key in ("em", "f1", "acc", "loss")}
  return {**mean, "domains": per} if len(per) > 1 else next(iter(per.values()))


def _check_finite(step: int, m: dict) -> None:
  bad = [k for k, v in m.items() if not np.isfinite(v)]
  if bad:
    raise FloatingPointError(
        f"meta-training step {step}: non-finite {', '.join(bad)} "
        f"({ {k: m[k] for k in bad} }); lower meta.lr or alpha_init")


def _append_line(path: pathlib.Path, record: dict) -> None:
  """Appends one JSON line to `path`, closed at once: a reader, or a run killed
  later, sees every line written so far."""
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


# What the trainer reads; a resumed run must agree on all of it (but how often
# it checkpoints), or it would silently continue a different run's optimiser.
_RUN_KEYS = ("seed", "model", "lora", "data", "meta")
_RESUMABLE_CHANGES = ("meta.checkpoint_every",)


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def check_run_config(workdir: pathlib.Path, config, resuming: bool) -> None:
  """Refuses to resume workdir's checkpoints under a different training config.

  workdir/run_config.json records the first start's _RUN_KEYS (written by the
  chief; a workdir from before the file is taken as it is).
  """
  run = json.loads(config.to_json_best_effort())
  run = _flat({k: run[k] for k in _RUN_KEYS if k in run})
  path = workdir / "run_config.json"
  if resuming and path.exists():
    old = json.loads(path.read_text())
    diff = sorted(k for k in set(old) | set(run)
                  if k not in _RESUMABLE_CHANGES and old.get(k, "<absent>") != run.get(k, "<absent>"))
    if diff:
      shown = ", ".join(f"{k}: {old.get(k, '<absent>')!r} -> {run.get(k, '<absent>')!r}"
                        for k in diff[:6])
      raise ValueError(f"{workdir} holds checkpoints of a run with a different config "
                       f"({shown}{', ...' if len(diff) > 6 else ''}); resume it with "
                       "the same flags or use a fresh workdir")
  elif parallel.is_chief():
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run, indent=1, sort_keys=True))


def train(config, workdir, stop_after: int | None = None) -> dict:
  """Meta-trains theta, alpha on config.data's training tasks; returns a summary.

  stop_after: leave after this many steps of this run (a pre-emptible job's
  slice); the next call resumes from the checkpoint. None = run to the end.

  Writes workdir/checkpoints (orbax, resumable), workdir/meta_state (the best
  dev state: F1, then loss; the last one without evaluation), workdir/metrics.jsonl
  and workdir/run_config.json (what a resume must match).
  """
  workdir = pathlib.Path(workdir).absolute()
  mc, dc = config.meta, config.data
  params, model_cfg, tokenizer = loaders.load_model(config.model)
  lcfg = lora_lib.LoraConfig.from_config(config.lora, model_cfg)
  mesh = parallel.mesh_from_config(config)
  if mc.batch_size % mesh.shape[parallel.DATA]:
    raise ValueError(f"meta.batch_size={mc.batch_size} must divide over "
                     f"{mesh.shape[parallel.DATA]} data-parallel devices")

  task_kw = dict(k=mc.k, mode=mc.mode, max_context_len=dc.max_context_len,
                 seed=config.seed, selection=mc.tasks)
  names = data_lib.domains(config)
  train_tasks, dev_tasks = tasks_lib.split_tasks(
      config, "train", tokenizer, num=mc.num_train_tasks if mc.num_train_tasks > 0 else -1,
      **task_kw), {}
  if mc.eval_every > 0 and mc.num_eval > 0:
    dev_tasks = tasks_lib.split_tasks(config, "dev", tokenizer, num=mc.num_eval,
                                      **task_kw)
  sizes = [len(train_tasks[n]) for n in names]
  weights = data_lib.domain_weights(config)
  train_tasks = [t for n in names for t in train_tasks[n]]
  logging.info("train tasks %s (weights %s), dev tasks %s, LoRA %s",
               dict(zip(names, sizes)), weights,
               {n: len(t) for n, t in dev_tasks.items()}, lcfg)

  if mc.init_from:
    theta, alpha, _ = state_lib.load(mc.init_from)
  else:
    theta = lora_lib.init_lora(jax.random.key(config.seed), model_cfg, lcfg)
    alpha = objective.init_alpha(theta, mc.alpha_mode, mc.alpha_init)
  meta = {"theta": theta, "alpha": alpha}
  tx = make_optimizer(mc, mc.num_steps)
  opt_state = tx.init(meta)
  step_fn = make_step(mesh, tx, config=model_cfg, lora_config=lcfg,
                      alpha_mode=mc.alpha_mode, first_order=mc.first_order,
                      remat=mc.remat)
  replicated = parallel.replicated(mesh)
  base_fingerprint = fingerprint.tree_fingerprint(params)  # Of the host copy.
  params = parallel.global_array(params, replicated)

  manager = ocp.CheckpointManager(
      workdir / "checkpoints",
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  start = 0
  check_run_config(workdir, config, resuming=manager.latest_step() is not None)
  if manager.latest_step() is not None:
    start = manager.latest_step()
    restored = manager.restore(start, args=ocp.args.StandardRestore(
        {"meta": meta, "opt_state": opt_state}))
    meta, opt_state = restored["meta"], restored["opt_state"]
    logging.info("resumed from step %d", start)
  meta, opt_state = parallel.global_array((meta, opt_state), replicated)

  info = {
      "lora": {"rank": lcfg.rank, "alpha": lcfg.alpha, "start": lcfg.start,
               "stop": lcfg.stop, "targets": list(lcfg.targets)},
      "alpha_mode": mc.alpha_mode, "mode": mc.mode, "tasks": mc.tasks,
      "prompt_style": prompts.style(tokenizer),
      "first_order": bool(mc.first_order),
      # What the state was trained on (serve it with the same K and lengths).
      "k": int(mc.k), "max_context_len": int(dc.max_context_len),
      "domains": dict(zip(names, sizes)), "weights": weights,
      "init_from": str(mc.init_from), "task_offset": int(mc.task_offset),
      "base_fingerprint": base_fingerprint,
      "tokenizer_fingerprint": tokenizer.fingerprint(),
      "config": json.loads(config.to_json_best_effort()),
  }
  eval_kw = dict(config=model_cfg, lora_config=lcfg, data_cfg=dc)
  # Best = highest dev F1, ties (e.g. all 0 early on) broken by lower dev loss.
  # Every process reads the same file, so all agree on when to save.
  best = (-1.0, -np.inf)
  if (workdir / "meta_state" / "info.json").exists():
    dev = json.loads((workdir / "meta_state" / "info.json").read_text()).get("dev", {})
    best = (dev.get("f1", -1.0), -dev.get("loss", np.inf))
  log = workdir / "metrics.jsonl" if parallel.is_chief() else None
  if dev_tasks and start == 0 and mc.init_from:  # Where the curve starts.
    dev0 = evaluate_domains(params, meta, dev_tasks, tokenizer, **eval_kw)
    logging.info("step 0 dev %s", dev0)
    if log is not None:
      _append_line(log, {"step": 0, "dev": dev0})
  bar = tqdm(range(start, mc.num_steps), initial=start, total=mc.num_steps,
             desc="meta-train", disable=not parallel.is_chief())
  last = {}
  for step in bar:
    if stop_after is not None and step >= start + stop_after:
      manager.save(step, args=ocp.args.StandardSave(
          {"meta": meta, "opt_state": opt_state}))
      break
    idx = batch_indices(config.seed, mc.task_offset + step, mc.batch_size, sizes, weights)
    batch = tasks_lib.collate([train_tasks[i] for i in idx], doc_buckets=dc.doc_buckets,
                              qa_buckets=dc.qa_buckets, pad_id=tokenizer.pad_id)
    batch = parallel.global_array(batch, parallel.data_sharded(mesh))
    t0 = time.perf_counter()
    meta, opt_state, m = step_fn(meta, opt_state, params, batch)
    m = {k: float(parallel.to_host(v)) for k, v in m.items()}
    m["step_time"] = time.perf_counter() - t0
    _check_finite(step + 1, m)
    alphas = np.concatenate([np.ravel(parallel.to_host(a))
                             for a in jax.tree.leaves(meta["alpha"])])
    m.update(step=step + 1, tasks=idx.tolist(), alpha_mean=float(alphas.mean()),
             alpha_min=float(alphas.min()), alpha_max=float(alphas.max()))
    bar.set_postfix(loss=f"{m['loss']:.3f}", gnorm=f"{m['grad_norm']:.2f}",
                    alpha=f"{m['alpha_mean']:.2e}")
    if dev_tasks and ((step + 1) % mc.eval_every == 0 or step + 1 == mc.num_steps):
      m["dev"] = evaluate_domains(params, meta, dev_tasks, tokenizer, **eval_kw)
      logging.info("step %d dev %s", step + 1, m["dev"])
      score = (m["dev"]["f1"], -m["dev"]["loss"])
      if score > best:  # orbax saves are collective: all processes.
        best = score
        state_lib.save(workdir / "meta_state", meta["theta"], meta["alpha"],
                       {**info, "step": step + 1, "dev": m["dev"]})
    if log is not None:
      _append_line(log, m)
    if (step + 1) % mc.checkpoint_every == 0 or step + 1 == mc.num_steps:
      manager.save(step + 1, args=ocp.args.StandardSave(
          {"meta": meta, "opt_state": opt_state}))
    last = m
  manager.wait_until_finished()
  if not dev_tasks:
    state_lib.save(workdir / "meta_state", meta["theta"], meta["alpha"],
                   {**info, "step": mc.num_steps})
  return {"last": last, "best_dev_f1": best[0], "meta": meta}
