"""The evaluation driver: every method on the same model, documents and questions.

  results = evaluate.run(config, workdir)     # what `launch.evaluate` calls

1. The model (config.model), config.eval.num_questions questions of
   config.eval.split from config.eval.first_question on, and their knowledge base:
   the questions' own passages plus config.data.num_distractors distractor
   documents (`eval_corpus`).
2. The meta-learned state theta*, alpha (`ensure_meta_state`): config.meta.init_from
   if set, else WORKDIR/meta_state, else a meta-training run into WORKDIR (short
   for the tiny and quickstart configs). Its base-model and tokenizer fingerprints
   must match the model (meta.state.load_for checks them).
3. The ReGrad engine over the knowledge base (`build_engine`): WORKDIR's knowledge
   base (regrad_jax/kb.py) made to hold exactly the corpus: its Gradient Bank at
   theta* (WORKDIR/bank, resumable), catalog and index (WORKDIR/index), which
   launch.answer then serves.
4. Each method of config.eval.methods takes in the knowledge base (CPT and
   Instruction CPT train on it, the retrieval methods index it), answers the
   questions (greedy, EM / F1 / acc against the gold answers) and has its drift
   measured (eval/drift.py) on the weights that answer a generic query. The
   fine-tuned baselines rag_ft / direct_ft load their adapter from
   config.eval.rag_ft_from / direct_ft_from, else WORKDIR/rag_ft (direct_ft),
   trained there first if absent (baselines/finetuned.py; short for tiny).
5. WORKDIR/results.json ({"methods": {name: {em, f1, acc, n, ppl_general, ppl_wiki,
   probe_acc, weight_l2, seconds}}, plus the setting), WORKDIR/results.md (the
   table) and WORKDIR/predictions.jsonl (every answer, with retrieved ids),
   rewritten after each method ("complete": false until the last is in).
"""
import json
import pathlib
import time

import jax
from absl import logging
from tqdm import tqdm

from regrad_jax import adapt
from regrad_jax import baselines
from regrad_jax.baselines import finetuned
from regrad_jax import data as data_lib
from regrad_jax import kb as kb_lib
from regrad_jax import parallel
from regrad_jax.eval import drift as drift_lib
from regrad_jax import metrics
from regrad_jax.eval import report
from regrad_jax.meta import state as meta_state
from regrad_jax.model import loaders

METHODS = ("direct", "direct_ft", "rag", "rag_ft", "cpt", "cpt_lora", "icpt",
           "icpt_lora", "prag", "regrad", "regrad_icl")
RETRIEVAL_METHODS = ("rag", "rag_ft", "prag", "regrad", "regrad_icl")


# --- Questions and documents ---------------------------------------------------


def select_records(config, split: str | None = None):
  """(split documents, config.eval.num_questions records (-1 = all) from
  config.eval.first_question on)."""
  split = split or config.eval.split
  docs, records = data_lib.load_split(config, split)
  n, first = int(config.eval.num_questions), int(config.eval.get("first_question", 0))
  if n == 0 or n < -1:
    raise ValueError(f"config.eval.num_questions must be -1 or > 0, got {n}")
  if not 0 <= first < len(records):
    raise ValueError(f"config.eval.first_question={first} must be in [0, {len(records)}) "
                     f"(questions in split {split!r})")
  records = records[first:] if n == -1 else records[first:first + n]
  if not records:
    raise ValueError(f"split {split!r} of {config.data.name!r} has no questions")
  return docs, records


def eval_corpus(config, split_docs, records, split: str | None = None):
  """The knowledge base: the records' gold passages, then the distractors.

  Passages of questions that are not asked are left out (a 40-question run
  banks 40 passages, not the whole split); documents without a gold-passage link
  cannot be placed, so a split whose records have no passage_id keeps all its
  documents.
  """
  split = split or config.eval.split
  wanted = {r.passage_id for r in records if r.passage_id is not None}
  own = [d for d in split_docs if d.id in wanted] if wanted else list(split_docs)
  missing = wanted - {d.id for d in own}
  if missing:
    raise ValueError(f"{len(missing)} gold passages are not in the {split} documents, "
                     f"e.g. {sorted(missing)[:3]}")
  split_ids = {d.id for d in split_docs}
  distractors = [d for d in data_lib.load_corpus(config, split) if d.id not in split_ids]
  return own + distractors


# --- Meta-learned state and the engine ------------------------------------------


def ensure_meta_state(config, workdir) -> pathlib.Path:
  """The meta-state directory to use, meta-training into `workdir` if none exists.

  config.meta.init_from (e.g. a released state: used as is, never retrained
  here), else WORKDIR/meta_state; when that does not exist either,
  `meta.trainer.train(config, workdir)` runs config.meta.num_steps steps and
  writes it.
  """
  if config.meta.init_from or (pathlib.Path(workdir) / "meta_state").exists():
    return meta_state.state_dir(config, workdir)  # Raises if it holds no state.
  from regrad_jax.meta import trainer  # Only a run without a state pays for it.
  logging.info("No meta-learned state: meta-training %d steps into %s",
               config.meta.num_steps, workdir)
  trainer.train(config, workdir)
  return meta_state.state_dir(config, workdir)


def build_engine(config, workdir, model, documents, *, kb_dir=None) -> adapt.ReGrad:
  """A ReGrad engine whose knowledge base holds exactly `documents`.

  `adapt.ReGrad.from_config` with the documents: committed to the knowledge base
  in kb_dir (default WORKDIR; created or resumed, documents already there not
  recomputed, others removed), stored as config.eval.long_documents says
  ("truncate": one passage per document, cut to the banked length, the protocol
  the meta-state was trained with and RAG reads). The meta state is found in
  WORKDIR (see `ensure_meta_state`).
  """
  chunking = kb_lib.Chunking.from_config(config, mode=config.eval.long_documents)
  return adapt.ReGrad.from_config(config, workdir, model=model, documents=documents,
                                  chunking=chunking, kb_dir=kb_dir, progress=True)


def fine_tuned_adapter(config, workdir, model, name: str):
  """(lora, LoraConfig) of rag_ft / direct_ft: config.eval.<name>_from, else
  WORKDIR/<name>, trained there first when absent (baselines/finetuned.py)."""
  if workdir is None:
    raise ValueError(f"method {name!r} needs a workdir (its adapter)")
  path = finetuned.ensure_adapter(config, workdir, model, name)
  lora, lcfg, _ = finetuned.load_adapter(path, model, method=name)
  return {"lora": lora, "lora_config": lcfg}


def make_method(name: str, *, config, model, engine=None, documents=(), workdir=None):
  """The method called `name` (see METHODS) on the shared model and engine.

  workdir: where rag_ft / direct_ft find (or train) their adapters.
  """
  if name == "direct":
    return baselines.Direct(model, config)
  if name == "direct_ft":
    return baselines.FineTunedDirect(model, config,
                                     **fine_tuned_adapter(config, workdir, model, name))
  if name in ("cpt", "cpt_lora"):
    return baselines.CPT(model, config, lora=name == "cpt_lora")
  if name in ("icpt", "icpt_lora"):
    return baselines.ICPT(model, config, lora=name == "icpt_lora")
  if name in RETRIEVAL_METHODS and engine is None:
    raise ValueError(f"method {name!r} needs the ReGrad engine's retriever")
  if name == "rag":
    return baselines.RAG(model, engine.retriever, documents, config)
  if name == "rag_ft":
    return baselines.FineTunedRAG(model, engine.retriever, documents, config,
                                  **fine_tuned_adapter(config, workdir, model, name))
  if name == "prag":
    return baselines.PRAG(model, engine.retriever, documents, config)
  if name in ("regrad", "regrad_icl"):
    return baselines.ReGradMethod(engine, mode="blind" if name == "regrad" else "icl",
                                  k=config.adapt.k)
  raise ValueError(f"unknown method {name!r}; choose from {METHODS}")


def check_methods(names) -> tuple[str, ...]:
  """Validates config.eval.methods: a non-empty tuple of distinct METHODS names
  (ValueError otherwise)."""
  names = tuple(names)
  bad = [n for n in names if n not in METHODS]
  if bad or not names or len(set(names)) != len(names):
    raise ValueError(f"config.eval.methods={names}: each must be one of {METHODS}, "
                     "at least one, no repeats")
  return names


def score(method, records) -> tuple[dict, list[dict]]:
  """Asks `method` every question: ({"em", "f1", "acc", "n"}, per-question rows
  with the question's own em / f1 / acc, 0-1)."""
  preds = method.answer([r.question for r in records])
  result = metrics.aggregate(preds, [r.answers for r in records])
  doc_ids = getattr(method, "last_doc_ids", None) or [None] * len(records)
  rows = [{"method": method.name, "id": r.id, "question": r.question,
           "answers": list(r.answers), "prediction": p, "doc_ids": d,
           "em": metrics.exact_match(p, r.answers), "f1": metrics.f1(p, r.answers),
           "acc": metrics.contains_answer(p, r.answers)}
          for r, p, d in zip(records, preds, doc_ids)]
  return result, rows


# --- The whole evaluation --------------------------------------------------------


def run(config, workdir) -> dict:
  """Evaluates config.eval.methods; writes results.json / results.md / predictions.

  Returns the results dict (as written to WORKDIR/results.json).
  """
  t_start = time.perf_counter()
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  names = check_methods(config.eval.methods)
  model = loaders.load_model(config.model)
  split_docs, records = select_records(config)
  corpus = eval_corpus(config, split_docs, records)
  tqdm.write(f"{len(records)} questions of {config.data.name}/{config.eval.split}, "
             f"{len(corpus)} documents; methods {', '.join(names)}")

  engine, meta_path, meta_info, timing = None, None, None, {}
  if any(n in RETRIEVAL_METHODS for n in names):
    t0 = time.perf_counter()
    meta_path = ensure_meta_state(config, workdir)
    info = json.loads((meta_path / "info.json").read_text())
    meta_info = {k: info.get(k) for k in ("step", "dev", "mode", "alpha_mode")}
    timing["meta_state"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    engine = build_engine(config, workdir, model, corpus)
    timing["bank_and_index"] = round(time.perf_counter() - t0, 1)

  meter = drift_lib.DriftMeter.from_config(config, model, corpus_ids=[d.id for d in corpus])
  setting = {
      "model": config.model.source, "data": config.data.name,
      "split": config.eval.split, "num_questions": len(records),
      "first_question": int(config.eval.get("first_question", 0)),
      "num_documents": len(corpus), "k": int(config.adapt.k),
      "meta_state": None if meta_path is None else str(meta_path),
      "meta_state_info": meta_info, "devices": jax.device_count(),
  }
  drift_note = {"weights": "the weights that answer a generic query; ReGrad, RAG, "
                           "PRAG, Direct: the base weights; CPT, Instruction CPT: "
                           "fine-tuned (LoRA merged); rag_ft, direct_ft: their "
                           "LoRA merged",
                "probe": f"greedy {config.eval.probe_tokens}-token cloze "
                         "continuation; gold answer within the first words",
                "ppl": f"token-level, windows <= {config.eval.ppl_window} tokens"}
  results, predictions = {}, []
  bar = tqdm(names, desc="methods")
  for name in bar:
    bar.set_description(f"method {name}")
    t0 = time.perf_counter()
    method = make_method(name, config=config, model=model, engine=engine,
                         documents=corpus, workdir=workdir)
    method.inject(corpus)
    qa, rows = score(method, records)
    figures = {**qa, **meter.measure(method.generic_params())}
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    results[name] = figures
    predictions += rows
    logging.info("%s: %s", name, figures)
    tqdm.write(f"{name}: F1 {figures['f1']:.1f}, EM {figures['em']:.1f}, acc "
               f"{figures['acc']:.1f}, ppl "
               f"{figures['ppl_general']:.2f}/{figures['ppl_wiki']:.2f}, probe "
               f"{figures['probe_acc']:.1f}, weight L2 {figures['weight_l2']:.4g} "
               f"({figures['seconds']:.0f} s)")
    del method  # CPT holds a weight copy and optimiser state.
    out = {"methods": results, "complete": len(results) == len(names),
           "setting": setting, "drift": drift_note, "timing": timing,
           "seconds": round(time.perf_counter() - t_start, 1)}
    _write(workdir, out, predictions)  # After each method: a run that dies keeps them.
  return out


def _write(workdir, out: dict, predictions: list[dict]) -> None:
  """WORKDIR/results.json, results.md and predictions.jsonl (chief only)."""
  if parallel.is_chief():
    (workdir / "results.json").write_text(json.dumps(out, indent=2))
    (workdir / "results.md").write_text(report.results_table(out["methods"]) + "\n")
    with open(workdir / "predictions.jsonl", "w") as f:
      for row in predictions:
        f.write(json.dumps(row) + "\n")
