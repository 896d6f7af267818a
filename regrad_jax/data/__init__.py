"""Data for every stage: QA splits, the bank's documents, general text, the probe.

  docs, records = data.load_split(config, "train")   # QA records + their passages
  corpus = data.load_corpus(config, "test")          # the bank: passages + distractors

  loaders.py   what config.data names (one dataset or a "+" mixture) and its loaders
  records.py   Document / QARecord and a reader per file format
  tiny.py      the tiny dataset, generated in code
  prepare.py   rebuilds the real data files from their public packages
"""
from regrad_jax.data.loaders import (FILES, READERS, SPLITS, domain_weights, domains,
                                     load_corpus, load_general_text, load_probe,
                                     load_split, resolve_root)
from regrad_jax.data.records import Document, QARecord

__all__ = [
    "Document", "QARecord", "SPLITS", "READERS", "FILES", "resolve_root", "domains",
    "domain_weights", "load_split",
    "load_corpus", "load_general_text", "load_probe",
]
