"""Does meta-learning make a document's gradient useful? The reference's ablation.

On dev tasks with their own gold passage(s) (as in meta-training: the gold passage
plus k-1 BM25 neighbours), held out from the dev questions the trainer picked its
best state on (the first config.meta.num_eval), every condition answers after the
inner update
theta' = theta - alpha (.) sum_c g_c(theta):

  closed_book   base model: a fresh LoRA (B = 0, an exact no-op) and alpha = 0.
  raw_grad:<s>  no meta-learning: a fresh LoRA and one fixed step size s, so
                theta' = -s * grad of the passages' LM loss (the reference finds
                this scores below closed-book).
  theta_only    the meta-learned theta* with alpha = 0 (what theta* knows alone).
  regrad        the meta-learned theta*, alpha; passages reach the model only
                through their gradient ("blind").
  rag           base model with the passages in the prompt.
  regrad_icl    theta*, alpha, and the passages also in the prompt.

Each row: EM / F1 / answer accuracy (percent, SQuAD-normalised; acc: the
answer contains a gold answer) of greedy answers, and the mean
answer loss (nats per answer token, teacher-forced), which moves long before F1.
A mixture (config.data.name "cpkc+squad") is evaluated per domain: the row's
figures are the domains' means, each domain's under "domains".
"""
import jax
import numpy as np
from absl import logging

from regrad_jax.meta import state as state_lib
from regrad_jax.meta import tasks as tasks_lib
from regrad_jax.meta import trainer
from regrad_jax.model import lora as lora_lib
from regrad_jax.model import loaders

TITLES = {"closed_book": "closed-book (base model)", "theta_only": "theta* alone (alpha = 0)",
          "regrad": "ReGrad: theta*, alpha, gold gradient (blind)",
          "rag": "RAG: base model, gold passage in the prompt",
          "regrad_icl": "ReGrad + ICL: theta*, alpha, gradient + passage in the prompt"}


def run(config, workdir, *, num: int = 200, raw_steps=(1e-2, 1e-1),
        only: tuple[str, ...] = ()) -> dict:
  """Evaluates every condition on `num` dev records after the first
  config.meta.num_eval (those selected the state; 0 to start at the first);
  `only`: a subset of the condition names (default: all).

  The meta-learned state comes from config.meta.init_from or WORKDIR/meta_state.
  Returns {condition: {"em", "f1", "acc", "loss", "n"}}, in the order of the table.
  """
  model = loaders.load_model(config.model)
  params, model_cfg, tokenizer = model
  meta = state_lib.load_for(config, workdir, model)
  theta, alpha, lcfg = meta.theta, meta.alpha, meta.lora_config
  fresh = lora_lib.init_lora(jax.random.key(config.seed), model_cfg, lcfg)
  zero = np.float32(0.0)
  kw = dict(k=config.meta.k, max_context_len=config.data.max_context_len,
            seed=config.seed, selection=config.meta.tasks, start=config.meta.num_eval,
            num=num)
  blind = tasks_lib.split_tasks(config, "dev", tokenizer, mode="blind", **kw)
  icl = tasks_lib.split_tasks(config, "dev", tokenizer, mode="icl", **kw)

  conditions = [("closed_book", fresh, zero, blind)]
  conditions += [(f"raw_grad:{s:g}", fresh, np.float32(s), blind) for s in raw_steps]
  conditions += [("theta_only", theta, zero, blind), ("regrad", theta, alpha, blind),
                 ("rag", fresh, zero, icl), ("regrad_icl", theta, alpha, icl)]
  out = {}
  for name, th, al, tasks in conditions:
    if only and name not in only:
      continue
    out[name] = trainer.evaluate_domains(
        params, {"theta": th, "alpha": al}, tasks, tokenizer, config=model_cfg,
        lora_config=lcfg, data_cfg=config.data, batch_size=config.eval.batch_size)
    logging.info("ablation %s: %s", name, out[name])  # Progress on long runs.
  return out


def table(rows: dict) -> str:
  """Markdown: condition | EM | F1 | acc | answer loss | n (| F1 per domain)."""
  domains = list(next(iter(rows.values()), {}).get("domains", {}))
  lines = ["| condition | EM | F1 | acc | answer loss | n |"
           + "".join(f" F1 {d} |" for d in domains),
           "|---|---|---|---|---|---|" + "---|" * len(domains)]
  for name, r in rows.items():
    title = TITLES.get(name, name.replace("raw_grad:", "raw LM gradient, fixed step "))
    n = r.get("n", sum(d["n"] for d in r.get("domains", {}).values()))
    lines.append(f"| {title} | {r['em']:.1f} | {r['f1']:.1f} | {r['acc']:.1f} | "
                 f"{r['loss']:.3f} | {n} |"
                 + "".join(f" {r['domains'][d]['f1']:.1f} |" for d in domains))
  return "\n".join(lines)
