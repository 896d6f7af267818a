"""Builds the Gradient Bank a config names: model, theta*, corpus -> WORKDIR/bank.

  bank, report = pipeline.build_from_config(config, workdir)   # launch.build_bank

Reads the meta-learned state from config.meta.init_from, else WORKDIR/meta_state
(written by launch.meta_train), refusing one trained on other weights or another
tokenizer. The corpus is `data.load_corpus(config, config.eval.split)`: the
split's passages plus config.data.num_distractors distractors. They are committed
to the knowledge base in WORKDIR (regrad_jax/kb.py: the bank in WORKDIR/bank, the
catalog WORKDIR/kb.sqlite): new documents added, changed texts replaced, long
documents chunked as config.data.long_documents says; documents injected since
stay. Every process of a multi-host run calls this; each computes its share of
the rows.
"""
import pathlib

from absl import logging

from regrad_jax import data as data_lib
from regrad_jax import kb as kb_lib
from regrad_jax.bank import codecs
from regrad_jax.bank.bank import Bank, BuildReport
from regrad_jax.bank.compute import GradientComputer
from regrad_jax.meta import state as state_lib
from regrad_jax.model import loaders


def bank_dir(workdir) -> pathlib.Path:
  """WORKDIR/bank, where the bank is built and the evaluation finds it."""
  return pathlib.Path(workdir) / "bank"


def make_computer(config, params, model_cfg, tokenizer, theta, lora_config
                  ) -> GradientComputer:
  """The gradient computer at theta* with the config's codec, lengths and batch."""
  return GradientComputer(
      params, theta, model_config=model_cfg, lora_config=lora_config,
      tokenizer=tokenizer, codec=codecs.from_config(config.bank),
      max_len=config.bank.max_context_len or config.data.max_context_len,
      buckets=config.data.doc_buckets,
      batch_size=config.bank.batch_size, raw_text=config.bank.raw_text)


def open_kb(config, workdir, computer) -> kb_lib.KnowledgeBase:
  """WORKDIR's knowledge base for writing `computer`'s gradients (created if absent)."""
  return kb_lib.KnowledgeBase.open_for(
      workdir, computer, rows_per_chunk=config.bank.rows_per_chunk,
      chunking=kb_lib.Chunking.from_config(config),
      lock_timeout=config.bank.get("lock_timeout", 0.0))


def build_from_config(config, workdir, *, progress: bool = True
                      ) -> tuple[Bank, BuildReport]:
  """Loads model, theta* and corpus, then commits the corpus to WORKDIR's
  knowledge base (resuming an interrupted build). Returns the bank and the bank's
  BuildReport of this call (its `kb` attribute: the kb.Report)."""
  params, model_cfg, tokenizer = loaders.load_model(config.model)
  theta, _, lcfg = state_lib.load_for(config, workdir, params, tokenizer)
  kb_lib.check_config(config, model_cfg, lcfg)
  docs = data_lib.load_corpus(config, config.eval.split)
  computer = make_computer(config, params, model_cfg, tokenizer, theta, lcfg)
  kb = open_kb(config, workdir, computer)
  logging.info("knowledge base %s: %d documents of the %s corpus, %d already committed",
               workdir, len(docs), config.eval.split, len(kb.documents))
  report = kb.add(docs, computer, kb_lib.Chunking.from_config(config), progress=progress)
  built = report.bank or BuildReport()
  built.kb = report
  return kb.bank, built
