"""Standard continual post-training (CPT): next-token fine-tuning on the documents.

The documents are learned *permanently*: the weights that answer every later
query are the fine-tuned ones, which is what makes CPT drift. Documents are taken
as a stream, in the order they arrive (no shuffling across `inject` calls, so a
sequence of injections is one continuous training run with one optimiser state):
each `inject(documents)` runs `epochs` passes over the new documents, in order,
`batch_size` documents per step.

A document is tokenised exactly as the Gradient Bank sees it
(`prompts.encode_document`: "Passage 1: <text>", BOS, cut to
config.data.max_context_len tokens) and padded to a config.data.doc_buckets
length, so the jitted step compiles once per bucket. The loss is the mean over
a step's documents of each document's mean next-token loss (`losses.lm_loss`),
the loss whose single gradient ReGrad banks.

Two variants (methods "cpt" and "cpt_lora"):
  full   every base weight is trained (AdamW; fp32 optimiser state, about 3x
         the model: ~1.6 GB for SmolLM2-135M).
  LoRA   a LoRA with the config.lora layout (the same layers, targets and rank
         as ReGrad's theta) is trained from a fresh init; the base is frozen.
         Generic queries are answered with the LoRA merged into the base.

Optimiser: gradient-norm clipping (config.eval.cpt_clip_norm), then AdamW with a
constant learning rate (config.eval.cpt_lr, or cpt_lora_lr for the LoRA
variant; a stream has no known end, so no decay) and weight decay config.eval.cpt_weight_decay (default 0: decay would pull
pretrained weights towards zero, a drift of its own).
"""
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from regrad_jax import batching
from regrad_jax import prompts
from regrad_jax.baselines import common
from regrad_jax.model import lora as lora_lib
from regrad_jax.model import losses


def encode_documents(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
  """Each text's token ids as banked (prompts.encode_document: "Passage 1: <text>",
  cut to max_len), unpadded: `doc_batches` pads them (bank.compute.tokenize_documents
  pads to buckets itself)."""
  return [prompts.encode_document(tokenizer, t, max_len, index=1)[0] for t in texts]


def doc_batches(ids: Sequence[Sequence[int]], batch_size: int, buckets, pad_id: int):
  """Yields (tokens, mask) batches of `batch_size` rows, in document order.

  The last batch is completed with empty rows (mask all False: they add nothing
  to the loss), so every batch has batch_size rows and a bucketed length.
  """
  for i in range(0, len(ids), batch_size):
    chunk = [list(x) for x in ids[i:i + batch_size]]
    length = batching.bucket(max(map(len, chunk)), buckets)
    yield batching.pad(chunk + [[]] * (batch_size - len(chunk)), length, pad_id)


def batch_loss(trainable, frozen, tokens, mask, target=None, *, config, lora_config):
  """Mean over real rows of each row's mean next-token loss (empty rows ignored).

  Full CPT: trainable = the base-layout params, frozen = None. LoRA CPT:
  trainable = the LoRA tree, frozen = the base params.
  target: None (every token after the first is predicted: the LM loss), or a
  (B, S) bool mask of the tokens predicted (losses.answer_loss; Instruction CPT
  masks its QA prompts, baselines/icpt.py).
  """
  if lora_config is None:
    params, lora = trainable, None
  else:
    params, lora = frozen, trainable
  if target is None:
    per_doc = losses.lm_loss(params, lora, tokens, mask, config=config,
                             lora_config=lora_config)
  else:
    per_doc = losses.answer_loss(params, lora, tokens, mask, target, config=config,
                                 lora_config=lora_config)
  real = jnp.any(mask, axis=-1).astype(jnp.float32)
  return jnp.sum(per_doc * real) / jnp.maximum(jnp.sum(real), jnp.float32(1))


def make_optimizer(lr: float, weight_decay: float, clip_norm: float
                   ) -> optax.GradientTransformation:
  """Global-norm clipping to `clip_norm`, then AdamW at a constant `lr`."""
  return optax.chain(optax.clip_by_global_norm(clip_norm),
                     optax.adamw(lr, weight_decay=weight_decay))


class CPT:
  """Continual post-training on a stream of documents.

  Args:
    model: the base model (loaders.Model). `params` is copied, never
      modified (the jitted step donates its own copy).
    config: reads eval.cpt_lr (cpt_lora_lr), cpt_epochs, cpt_batch_size,
      cpt_weight_decay, cpt_clip_norm; data.max_context_len, data.doc_buckets;
      adapt.batch_size, adapt.max_new_tokens; lora.* (LoRA
      variant); seed.
    lora: train a LoRA (config.lora layout) instead of every weight.
  Attributes:
    steps: optimiser steps taken so far.
    history: (step, loss) of every step.
  """

  def __init__(self, model, config, *, lora: bool = False):
    ec = config.eval
    params, model_cfg, self.tokenizer = model
    self.base, self.model_cfg = params, model_cfg
    self.use_lora = bool(lora)
    self.name = "cpt_lora" if self.use_lora else "cpt"
    self.epochs = int(ec.cpt_epochs)
    self.batch_size = int(ec.cpt_batch_size)
    if self.epochs < 1 or self.batch_size < 1:
      raise ValueError(f"eval.cpt_epochs ({self.epochs}) and eval.cpt_batch_size "
                       f"({self.batch_size}) must be >= 1")
    self.max_len = int(config.data.max_context_len)
    self.doc_buckets = tuple(config.data.doc_buckets)
    if max(self.doc_buckets) < self.max_len:
      raise ValueError(f"data.doc_buckets {self.doc_buckets} must reach "
                       f"data.max_context_len={self.max_len}")
    self.answer_batch = int(config.adapt.batch_size)
    self.max_new_tokens = int(config.adapt.max_new_tokens)
    if self.use_lora:
      self.lora_config = lora_lib.LoraConfig.from_config(config.lora, model_cfg)
      self.trainable = lora_lib.init_lora(jax.random.key(config.seed), model_cfg,
                                          self.lora_config)
    else:
      self.lora_config = None
      self.trainable = jax.tree.map(jnp.copy, params)  # The step donates it.
    lr = ec.cpt_lora_lr if self.use_lora else ec.cpt_lr
    self.tx = make_optimizer(float(lr), float(ec.cpt_weight_decay),
                             float(ec.cpt_clip_norm))
    self.opt_state = self.tx.init(self.trainable)
    self.steps = 0
    self.history: list[tuple[int, float]] = []
    self._merged = None
    loss = functools.partial(batch_loss, config=model_cfg,
                             lora_config=self.lora_config)

    def step(trainable, opt_state, frozen, tokens, mask, target=None):
      value, grads = jax.value_and_grad(loss)(trainable, frozen, tokens, mask, target)
      updates, opt_state = self.tx.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state, value

    self._step = jax.jit(step, donate_argnums=(0, 1))
    self._loss = jax.jit(loss)

  @property
  def _frozen(self):
    return self.base if self.use_lora else None

  def inject(self, documents: Sequence) -> None:
    """Trains on the documents' text, in order, for `epochs` passes."""
    if not documents:
      return
    ids = encode_documents(self.tokenizer, [d.text for d in documents], self.max_len)
    self.train_stream(lambda: doc_batches(ids, self.batch_size, self.doc_buckets,
                                          self.tokenizer.pad_id),
                      -(-len(ids) // self.batch_size))

  def train_stream(self, batches, n_batches: int) -> None:
    """`epochs` passes of optimiser steps over `batches()` (an iterable of
    (tokens, mask) or (tokens, mask, target) arrays; see batch_loss)."""
    bar = tqdm(total=self.epochs * n_batches, desc=self.name, leave=False)
    for _ in range(self.epochs):
      for batch in batches():
        self.trainable, self.opt_state, value = self._step(
            self.trainable, self.opt_state, self._frozen, *batch)
        self.steps += 1
        value = float(value)
        if not np.isfinite(value):
          raise FloatingPointError(f"CPT step {self.steps}: non-finite loss "
                                   f"{value}; lower config.eval.cpt_lr")
        self.history.append((self.steps, value))
        bar.set_postfix(loss=f"{value:.3f}")
        bar.update()
    bar.close()
    self._merged = None

  def lm_loss(self, documents: Sequence) -> float:
    """Mean per-document LM loss of the current weights on `documents`."""
    ids = encode_documents(self.tokenizer, [d.text for d in documents], self.max_len)
    total = 0.0
    for tokens, mask in doc_batches(ids, self.batch_size, self.doc_buckets,
                                    self.tokenizer.pad_id):
      rows = float(np.sum(mask.any(-1)))
      total += rows * float(self._loss(self.trainable, self._frozen, tokens, mask))
    return total / len(ids)

  def generic_params(self) -> dict:
    """The weights every query is answered with (LoRA merged into the base)."""
    if not self.use_lora:
      return self.trainable
    if self._merged is None:
      self._merged = lora_lib.merge_into_base(self.base, self.trainable,
                                              self.lora_config)
    return self._merged

  def answer(self, questions: Sequence[str]) -> list[str]:
    ids = common.qa_prompt_ids(self.tokenizer, questions)
    lora = self.trainable if self.use_lora else None
    params = self.base if self.use_lora else self.trainable
    return common.generate_answers(
        params, ids, self.tokenizer, config=self.model_cfg,
        batch_size=self.answer_batch, max_new_tokens=self.max_new_tokens,
        lora=lora, lora_config=self.lora_config, desc=self.name)
