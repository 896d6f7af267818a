"""Stage 2 from a config: model, theta*, gradient computer and knowledge base, in one place.

  parts = pipeline.open_knowledge(config, workdir, writer=True)   # every builder
  bank, report = pipeline.build_from_config(config, workdir)      # launch.build_bank

`open_knowledge` is the one sequence "load the model, load the meta-learned
state, check the config against it, make the gradient computer, open the
knowledge base" that the bank build, the ReGrad engine (adapt/engine.py:
`ReGrad.from_config`) and the evaluation share. The state is read from
config.meta.init_from, else WORKDIR/meta_state (written by launch.meta_train),
refusing one trained on other weights or another tokenizer.

`build_from_config` commits the corpus `data.load_corpus(config, config.eval.split)`
(the split's passages plus config.data.num_distractors distractors) to the
knowledge base in WORKDIR (regrad_jax/kb.py: the bank in WORKDIR/bank, the catalog
WORKDIR/kb.sqlite): new documents added, changed texts replaced, long documents
chunked as config.data.long_documents says; documents injected since stay. Every
process of a multi-host run calls this; each computes its share of the rows.
"""
import concurrent.futures
import pathlib
from typing import NamedTuple

from absl import logging

from regrad_jax import data as data_lib
from regrad_jax import kb as kb_lib
from regrad_jax.bank import codecs
from regrad_jax.bank.bank import Bank, BuildReport
from regrad_jax.bank.compute import GradientComputer
from regrad_jax.meta import state as state_lib
from regrad_jax.model import loaders


class Knowledge(NamedTuple):
  """What `open_knowledge` returns: everything a bank builder or engine needs."""
  model: loaders.Model
  meta: state_lib.MetaState
  computer: GradientComputer
  kb: kb_lib.KnowledgeBase


def make_computer(config, model: loaders.Model, meta: state_lib.MetaState
                  ) -> GradientComputer:
  """The gradient computer at theta* with the config's codec, lengths and batch."""
  return GradientComputer(
      model.params, meta.theta, model_config=model.config,
      lora_config=meta.lora_config, tokenizer=model.tokenizer,
      codec=codecs.from_config(config.bank),
      max_len=config.bank.max_context_len or config.data.max_context_len,
      buckets=config.data.doc_buckets,
      batch_size=config.bank.batch_size, raw_text=config.bank.raw_text)


def open_knowledge(config, workdir, *, model: loaders.Model | None = None,
                   writer: bool = False, kb_dir=None) -> Knowledge:
  """Model, meta state, computer and knowledge base for `config`.

  Args:
    workdir: where the meta state is found (see meta.state.state_dir).
    model: the loaded model (None: loaded from config.model).
    writer: open the knowledge base for writing (created when absent; every
      process calls this) instead of read-only (verified, creates nothing).
    kb_dir: the knowledge base's folder (default: workdir).
  Raises:
    ValueError: the state or the knowledge base contradicts the config (LoRA
      layout, base weights, tokenizer, bank identity or codec), naming it.
    FileNotFoundError: no state, or (read-only) no knowledge base, saying what to run.
  """
  kb_dir = pathlib.Path(workdir if kb_dir is None else kb_dir)
  lock_timeout = config.bank.get("lock_timeout", 0.0)
  if not writer:  # Fail on a missing knowledge base before loading anything.
    kb = kb_lib.KnowledgeBase.open(kb_dir, lock_timeout=lock_timeout)
  if model is None:  # The weights load while the state is read (both mostly I/O).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      loading = pool.submit(loaders.load_model, config.model)
      meta = state_lib.load_for(config, workdir, loading.result)
      model = loading.result()
  else:
    meta = state_lib.load_for(config, workdir, model)
  kb_lib.check_config(config, model.config, meta.lora_config)
  computer = make_computer(config, model, meta)
  if writer:
    kb = kb_lib.KnowledgeBase.open_for(
        kb_dir, computer, rows_per_chunk=config.bank.rows_per_chunk,
        chunking=kb_lib.Chunking.from_config(config), lock_timeout=lock_timeout)
  kb.bank.check(identity=computer.identity, codec=computer.codec)
  return Knowledge(model, meta, computer, kb)


def build_from_config(config, workdir, *, progress: bool = True
                      ) -> tuple[Bank, BuildReport]:
  """Loads model, theta* and corpus, then commits the corpus to WORKDIR's
  knowledge base (resuming an interrupted build). Returns the bank and the bank's
  BuildReport of this call (its `kb` attribute: the kb.Report)."""
  k = open_knowledge(config, workdir, writer=True)
  docs = data_lib.load_corpus(config, config.eval.split)
  logging.info("knowledge base %s: %d documents of the %s corpus, %d already committed",
               workdir, len(docs), config.eval.split, len(k.kb.documents))
  report = k.kb.add(docs, k.computer, kb_lib.Chunking.from_config(config),
                    progress=progress)
  built = report.bank or BuildReport()
  built.kb = report
  return k.kb.bank, built


def check_and_repair(workdir, config=None) -> kb_lib.CheckReport:
  """kb.check; with a config, recomputes the damaged rows from their stored texts
  (theta* from the config's state, which must match the bank's identity), saves a
  fresh index when it is absent, stale or damaged, and checks again."""
  report = kb_lib.check(workdir)
  if config is None or report.ok or not report.documents:
    return report
  from regrad_jax.retrieval import retriever as retriever_lib  # pylint: disable=g-import-not-at-top
  k = open_knowledge(config, workdir)
  if report.damaged:
    k.kb.repair(report.damaged, k.computer)
  k.kb.save_index(retriever_lib.Retriever.build(config, k.kb.passages))
  return kb_lib.check(workdir)
