"""Sequential injection: QA and drift as documents keep arriving.

The documents of config.eval.split's questions arrive in order, and after each
cumulative increment of config.eval.increments (e.g. 125, 250, 500, 1000
documents) every method is asked the questions of all documents injected so far
(or an even spread of config.eval.injection_questions of them) and its drift is
measured (eval/drift.py):

  CPT         keeps training, one continuous run: each increment's new documents,
              in order (full weights or LoRA).
  ReGrad      grows its bank (and index) with the new documents' gradients; the
              weights never change.
  ICPT        as CPT, each document followed by training QA pairs.
  RAG, PRAG,  grow the shared index (PRAG trains adapters of retrieved documents;
  rag_ft      rag_ft answers with its fixed fine-tuned LoRA).
  Direct      nothing (the floor; direct_ft: its fixed fine-tuned LoRA).

The bank and index start with the distractors (config.data.num_distractors) and
the first increment; later increments are appended through the engine's
`inject`. The knowledge base WORKDIR/injection/{bank,kb.sqlite,index} is rebuilt
on every run. Outputs in WORKDIR/injection/: curve.json ({"docs": [...], "methods":
{name: [figures per increment]}}), table.md and curve.png (F1 and drift against
documents injected).
"""
import json
import pathlib
import shutil
import time

from absl import logging
from tqdm import tqdm

from regrad_jax import data as data_lib
from regrad_jax import kb as kb_lib
from regrad_jax import parallel
from regrad_jax.eval import drift as drift_lib
from regrad_jax.eval import evaluate
from regrad_jax.eval import report
from regrad_jax.model import loaders


def document_stream(split_docs, records) -> list:
  """Documents of the records' gold passages, in the order first asked about."""
  by_id = {d.id: d for d in split_docs}
  order = dict.fromkeys(r.passage_id for r in records if r.passage_id in by_id)
  if not order:
    raise ValueError("sequential injection needs questions with gold passages")
  return [by_id[i] for i in order]


def check_increments(increments, available: int) -> list[int]:
  """Strictly increasing positive cumulative counts, the last <= available."""
  inc = [int(n) for n in increments]
  if not inc or inc[0] <= 0 or any(b <= a for a, b in zip(inc, inc[1:])):
    raise ValueError(f"config.eval.increments={tuple(inc)} must be positive and "
                     "strictly increasing")
  if inc[-1] > available:
    raise ValueError(f"config.eval.increments reaches {inc[-1]} documents but the "
                     f"{available} questions asked have only {available} passages")
  return inc


def spread(items: list, n: int) -> list:
  """n items evenly spaced over `items` (all of them when n is -1 or too big)."""
  if n == -1 or n >= len(items):
    return list(items)
  return [items[i * len(items) // n] for i in range(n)]


def run(config, workdir) -> dict:
  """Runs the experiment; returns the curve (also written to WORKDIR/injection)."""
  t_start = time.perf_counter()
  workdir = pathlib.Path(workdir).absolute()
  out_dir = workdir / "injection"
  out_dir.mkdir(parents=True, exist_ok=True)
  names = evaluate.check_methods(config.eval.methods)
  # Retrieval views of the engine inject first: RAG / PRAG then find the shared
  # index already extended and only record the texts.
  names = tuple(sorted(names, key=lambda n: n not in ("regrad", "regrad_icl")))
  model = loaders.load_model(config.model)
  split_docs, records = data_lib.load_split(config, config.eval.split)
  stream = document_stream(split_docs, records)
  increments = check_increments(config.eval.increments, len(stream))
  split_ids = {d.id for d in split_docs}
  distractors = [d for d in data_lib.load_corpus(config, config.eval.split)
                 if d.id not in split_ids]
  corpus_ids = [d.id for d in distractors] + [d.id for d in stream[:increments[-1]]]

  engine = None
  if any(n in evaluate.RETRIEVAL_METHODS for n in names):
    evaluate.ensure_meta_state(config, workdir)
    # The knowledge base grows from the first increment, at this run's theta*:
    # never reuse a previous run's.
    for name in ("bank", "index"):
      shutil.rmtree(out_dir / name, ignore_errors=True)
    (out_dir / kb_lib.CATALOG).unlink(missing_ok=True)
    engine = evaluate.build_engine(config, workdir, model,
                                   distractors + stream[:increments[0]], kb_dir=out_dir)
  methods = [evaluate.make_method(n, config=config, model=model, engine=engine,
                                  documents=distractors, workdir=workdir)
             for n in names]
  meter = drift_lib.DriftMeter.from_config(config, model, corpus_ids=corpus_ids)

  curve = {"docs": [], "methods": {m.name: [] for m in methods}}
  prev = 0
  for n in tqdm(increments, desc="increments"):
    new = stream[prev:n]
    injected = {d.id for d in stream[:n]}
    asked = spread([r for r in records if r.passage_id in injected],
                   int(config.eval.injection_questions))
    curve["docs"].append(n)
    for method in methods:
      t0 = time.perf_counter()
      method.inject(new)
      t_inject = time.perf_counter() - t0
      qa, _ = evaluate.score(method, asked)
      figures = {**qa, **meter.measure(method.generic_params()),
                 "inject_seconds": round(t_inject, 1),
                 "seconds": round(time.perf_counter() - t0, 1)}
      curve["methods"][method.name].append(figures)
      logging.info("%d docs, %s: %s", n, method.name, figures)
      tqdm.write(f"{n} documents, {method.name}: F1 {figures['f1']:.1f}, acc "
                 f"{figures['acc']:.1f} "
                 f"(n={figures['n']}), ppl {figures['ppl_general']:.2f}, probe "
                 f"{figures['probe_acc']:.1f}, weight L2 {figures['weight_l2']:.4g}")
    prev = n
    if parallel.is_chief():  # Partial curves too: a long run shows progress.
      (out_dir / "curve.json").write_text(json.dumps(curve, indent=2))

  curve["setting"] = {"model": config.model.source, "data": config.data.name,
                      "split": config.eval.split,
                      "num_distractors": len(distractors),
                      "seconds": round(time.perf_counter() - t_start, 1)}
  if parallel.is_chief():
    (out_dir / "curve.json").write_text(json.dumps(curve, indent=2))
    (out_dir / "table.md").write_text(report.injection_table(curve) + "\n")
    report.plot_injection(curve, out_dir / "curve.png")
  return curve
