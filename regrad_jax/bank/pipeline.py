"""Builds the Gradient Bank a config names: model, theta*, corpus -> WORKDIR/bank.

  bank, report = pipeline.build_from_config(config, workdir)   # launch.build_bank

Reads the meta-learned state from config.meta.init_from, else WORKDIR/meta_state
(written by launch.meta_train), refusing one trained on other weights or another
tokenizer. The corpus is `data.load_corpus(config, config.eval.split)`: the
split's passages plus config.data.num_distractors distractors. The bank lives in
WORKDIR/bank, where the evaluation finds (and extends) it. Every process of a
multi-host run calls this; each computes its share of the rows.
"""
import pathlib

from absl import logging

from regrad_jax import data as data_lib
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


def build_from_config(config, workdir, *, progress: bool = True
                      ) -> tuple[Bank, BuildReport]:
  """Loads model, theta* and corpus, then builds (or resumes) WORKDIR/bank."""
  params, model_cfg, tokenizer = loaders.load_model(config.model)
  theta, _, lcfg = state_lib.load_for(config, workdir, params, tokenizer)
  docs = data_lib.load_corpus(config, config.eval.split)
  computer = make_computer(config, params, model_cfg, tokenizer, theta, lcfg)
  bank = Bank.open_for(bank_dir(workdir), computer,
                       rows_per_chunk=config.bank.rows_per_chunk)
  logging.info("bank %s: %d documents of the %s corpus, %d already present",
               bank.path, len(docs), config.eval.split, len(bank))
  return bank, bank.build(docs, computer, progress=progress)
