"""Fine-tuned RAG and Direct: a LoRA trained on the meta-state's training tasks.

The reference's strongest baselines: both sides of the comparison have then
learned the short answer format, so what remains between them is knowledge.

  rag_ft      a LoRA with theta*'s layout (config.lora: same layers, targets,
              rank) trained first-order (AdamW on the answer cross-entropy,
              prompt masked, answer + EOS as in meta-training) on the same
              training questions, in the same order, with the task's passages
              in the prompt (meta.tasks.build_tasks(..., mode="icl"): the gold
              passage plus meta.k - 1 BM25 neighbours, cut as a gradient sees
              them). It answers with the retriever and K of ReGrad (as RAG).
  direct_ft   the same without passages (mode="blind"); answers closed-book.

Budget: config.eval.ft_steps x ft_batch_size tasks (0 = meta.num_steps x
meta.batch_size, the meta-state's own budget). Step s trains on the tasks the
meta-trainer's step s sees (meta.trainer.batch_indices), so for the same seed
and budget both have seen exactly the same questions.

The adapter is saved like the meta state (meta.state.save_tree: DIR/arrays
holds {"lora": ...}; DIR/info.json its LoRA layout, base-model and tokenizer
fingerprints, the method, the training setting and losses); `load_adapter`
refuses one trained on other base weights or another tokenizer.

A generic query is answered with the LoRA merged into the base (the adapter is
permanent, as a deployed fine-tune is), so drift is measured on those weights.
"""
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

from regrad_jax import data as data_lib
from regrad_jax import fingerprint
from regrad_jax.baselines import cpt
from regrad_jax.baselines.direct import Direct
from regrad_jax.baselines.rag import RAG
from regrad_jax.meta import state as state_lib
from regrad_jax.meta import tasks as tasks_lib
from regrad_jax.meta import trainer
from regrad_jax.model import lora as lora_lib
from regrad_jax.model import losses

MODES = {"rag_ft": "icl", "direct_ft": "blind"}  # Method -> training-task mode.


def budget(config) -> tuple[int, int]:
  """(steps, tasks per step): config.eval.ft_*, 0 = the meta-state's."""
  ec, mc = config.eval, config.meta
  steps = int(ec.ft_steps) or int(mc.num_steps)
  batch = int(ec.ft_batch_size) or int(mc.batch_size)
  if steps < 1 or batch < 1:
    raise ValueError(f"eval.ft_steps ({steps}) and eval.ft_batch_size ({batch}) "
                     "must be >= 1 (0 = the meta-state's)")
  return steps, batch


def training_records(config) -> tuple[list, list[int]]:
  """The meta-trainer's training records, domain after domain (data.domains,
  meta.num_train_tasks of each), and how many each domain holds."""
  _, records = data_lib.load_split(config, "train")
  n, out, sizes = int(config.meta.num_train_tasks), [], []
  for name in data_lib.domains(config):
    recs = [r for r in records if r.domain == name]
    out += recs[:n] if n > 0 else recs
    sizes.append(len(out) - sum(sizes))
  return out, sizes


def task_order(config, sizes) -> np.ndarray:
  """(steps, batch) task indices into the domains' tasks concatenated: step s
  holds the meta-trainer's step-s tasks (same seed, sizes and data.weights)."""
  steps, batch = budget(config)
  weights = data_lib.domain_weights(config)
  return np.stack([trainer.batch_indices(config.seed, s, batch, sizes, weights)
                   for s in range(steps)])


def ft_loss(lora, params, tokens, mask, target, *, config, lora_config):
  """Mean over the batch of each task's answer loss (prompt masked)."""
  return jnp.mean(losses.answer_loss(params, lora, tokens, mask, target, config=config,
                                     lora_config=lora_config))


def train_adapter(config, model, method: str
                  ) -> tuple[dict, lora_lib.LoraConfig, list[float]]:
  """Trains the rag_ft / direct_ft LoRA -> (lora, its LoraConfig, loss per step).

  From a fresh init (B = 0: the base model) of the config.lora layout; AdamW at
  eval.ft_lr (constant, weight decay eval.ft_weight_decay) after clipping to
  eval.ft_clip_norm (cpt.make_optimizer).
  """
  if method not in MODES:
    raise ValueError(f"no fine-tuned baseline {method!r}; choose from {list(MODES)}")
  mode, dc = MODES[method], config.data
  params, model_cfg, tokenizer = model
  # Built as the meta-trainer builds them (per domain, BM25 neighbours from the
  # domain's own passages, shuffle seeded by the record's index, meta.tasks
  # selection): a task's passages are those meta-training shows.
  n = int(config.meta.num_train_tasks)
  split = tasks_lib.split_tasks(
      config, "train", tokenizer, num=n if n > 0 else -1,
      k=int(config.meta.k) if mode == "icl" else 1,  # Blind prompts hold no passages.
      mode=mode, max_context_len=dc.max_context_len, seed=config.seed,
      selection=config.meta.tasks)
  names = data_lib.domains(config)
  tasks = [t for name in names for t in split[name]]
  order = task_order(config, [len(split[name]) for name in names])
  lcfg = lora_lib.LoraConfig.from_config(config.lora, model_cfg)
  lora = lora_lib.init_lora(jax.random.key(config.seed), model_cfg, lcfg)
  ec = config.eval
  tx = cpt.make_optimizer(float(ec.ft_lr), float(ec.ft_weight_decay),
                          float(ec.ft_clip_norm))

  @jax.jit  # params an argument, not a closure: no 0.5 GB constant in the program.
  def step(lora, opt_state, params, tokens, mask, target):
    value, grads = jax.value_and_grad(ft_loss)(lora, params, tokens, mask, target,
                                               config=model_cfg, lora_config=lcfg)
    updates, opt_state = tx.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, value

  opt_state, history = tx.init(lora), []
  bar = tqdm(order, desc=method, leave=False)
  for rows in bar:
    b = tasks_lib.collate([tasks[i] for i in rows], doc_buckets=dc.doc_buckets,
                          qa_buckets=dc.qa_buckets, pad_id=tokenizer.pad_id)
    lora, opt_state, value = step(lora, opt_state, params, b["qa_tokens"],
                                  b["qa_mask"], b["target_mask"])
    history.append(float(value))
    if not np.isfinite(history[-1]):
      raise FloatingPointError(f"{method} step {len(history)}: non-finite loss "
                               f"{history[-1]}; lower config.eval.ft_lr")
    bar.set_postfix(loss=f"{history[-1]:.3f}")
  return jax.tree.map(np.asarray, lora), lcfg, history


# --- Saved adapters ---------------------------------------------------------------


def save_adapter(path, lora: dict, lcfg: lora_lib.LoraConfig, info: dict) -> None:
  """Writes DIR/arrays ({"lora": lora}) and DIR/info.json (meta.state format)."""
  state_lib.save_tree(path, {"lora": lora}, {**info, "lora": state_lib.lora_info(lcfg)})


def load_adapter(path, model, method: str | None = None
                 ) -> tuple[dict, lora_lib.LoraConfig, dict]:
  """(lora, LoraConfig, info) of a saved adapter for this model.

  Raises:
    FileNotFoundError: nothing saved at `path`.
    ValueError: trained on other base weights or another tokenizer, or for a
      method other than `method` (when given).
  """
  tree, info = state_lib.load_tree(
      pathlib.Path(path).expanduser(),
      expect_base=fingerprint.tree_fingerprint(model.params),
      expect_tokenizer=model.tokenizer.fingerprint(), what="fine-tuned adapter")
  if method is not None and info.get("method") != method:
    raise ValueError(f"the adapter at {path} is for {info.get('method')!r}, not {method!r}")
  return tree["lora"], state_lib.lora_config_from_info(info), info


def train_and_save(config, path, model, method: str) -> dict:
  """Trains the `method` adapter and saves it at `path`; returns its info."""
  t0 = time.perf_counter()
  lora, lcfg, history = train_adapter(config, model, method)
  steps, batch = budget(config)
  info = {"method": method, "mode": MODES[method], "k": int(config.meta.k),
          "steps": steps, "batch_size": batch, "tasks": steps * batch,
          "lr": float(config.eval.ft_lr),
          "loss_first": history[0], "loss_last": history[-1],
          "loss_last_10": float(np.mean(history[-10:])),
          "seconds": round(time.perf_counter() - t0, 1),
          "base_fingerprint": fingerprint.tree_fingerprint(model.params),
          "tokenizer_fingerprint": model.tokenizer.fingerprint(),
          "config": json.loads(config.to_json_best_effort())}
  save_adapter(path, lora, lcfg, info)
  if jax.process_index() == 0:
    with open(pathlib.Path(path) / "train_metrics.jsonl", "w") as f:
      for s, value in enumerate(history):
        f.write(json.dumps({"step": s + 1, "loss": value}) + "\n")
  return info


def ensure_adapter(config, workdir, model, method: str) -> pathlib.Path:
  """The adapter directory of `method`: config.eval.<method>_from if set (used
  as is), else WORKDIR/<method>, trained there first if it does not exist."""
  given = config.eval[f"{method}_from"]
  path = pathlib.Path(given or pathlib.Path(workdir) / method).expanduser()
  if not given and not (path / "info.json").exists():
    logging.info("No %s adapter: training %d steps into %s", method,
                 budget(config)[0], path)
    train_and_save(config, path, model, method)
  return path


# --- The methods --------------------------------------------------------------------


class _Permanent:
  """generic_params of a method whose LoRA answers every query."""
  _generic = None

  def generic_params(self) -> dict:
    """The base with the LoRA merged in (computed once)."""
    if self._generic is None:
      self._generic = lora_lib.merge_into_base(self.params, self.lora, self.lora_config)
    return self._generic


class FineTunedRAG(_Permanent, RAG):
  """RAG answering with the rag_ft LoRA (same retriever and K as ReGrad).

  Args: as RAG, plus lora / lora_config (`load_adapter`).
  """
  name = "rag_ft"

  def __init__(self, model, retriever, documents, config, *,
               lora: dict, lora_config: lora_lib.LoraConfig, k: int | None = None):
    super().__init__(model, retriever, documents, config, k=k)
    self.lora, self.lora_config = jax.tree.map(jnp.asarray, lora), lora_config


class FineTunedDirect(_Permanent, Direct):
  """Closed-book answers with the direct_ft LoRA.

  Args: as Direct, plus lora / lora_config (`load_adapter`).
  """
  name = "direct_ft"

  def __init__(self, model, config, *, lora: dict,
               lora_config: lora_lib.LoraConfig):
    super().__init__(model, config)
    self.lora, self.lora_config = jax.tree.map(jnp.asarray, lora), lora_config
