"""The Gradient Bank: per-document LoRA gradients at theta*, stored with TensorStore.

  computer = bank.GradientComputer(params, theta, model_config=..., lora_config=...,
                                   tokenizer=..., codec=bank.codecs.make("qzstd"),
                                   max_len=128, buckets=(32, 64, 128))
  b = bank.Bank.open_for(path, computer)      # creates it when absent
  b.build(docs, computer, progress=True)      # resumable; appends new ids
  tree = b.gather_sum([["id1", "id2", "id3"], ...])   # leaves (Q, n, ...)
"""
from regrad_jax.bank import codecs
from regrad_jax.bank.bank import Bank, BankMismatchError, BuildReport
from regrad_jax.bank.compute import (GradientComputer, Identity, flatten,
                                     tokenize_documents, unflatten)
