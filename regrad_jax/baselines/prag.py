"""PRAG-style parametric RAG: one LoRA trained per document, top-K merged per query.

Parametric RAG (Su et al., 2025) encodes every document offline as its own LoRA
(FFN projections gate/up/down of every layer; the reference uses rank 2, alpha 32,
AdamW lr 3e-4, all adapters from one shared random init). At query time the
adapters of the top-K retrieved documents are combined by PEFT's "cat" rule (A
and B concatenated along the rank axis, i.e. Delta W = sum_k scale * A_k B_k)
and the model answers with the combined adapter, passages not in the prompt.

What is run here, and how it differs from the reference:
  - Training data: the document's own next-token loss only, on the same tokens
    the Gradient Bank sees (prompts.encode_document). The reference trains on
    LLM-generated rewrites and QA pairs of each document; there is no generator
    model here, so this is the cheaper "document-only" PRAG.
  - Schedule: `prag_steps` AdamW steps on the one document (config.eval.prag_*).
  - Scale: adapters are trained lazily, only for documents some evaluated
    question retrieves (the reference, likewise, trains only the top-3 of each
    test question); each is trained once and cached in host memory.
Training is batched: `batch_size` documents, each with its own adapter (a
batched LoRA tree, leaves (n, D, ...)), in one jitted call that runs all steps.
Each document's loss depends only on its own adapter and AdamW is elementwise,
so this equals training the documents one by one.

Generic queries (drift) are answered with the base weights: adapters are applied
only to the queries that retrieve their documents and never persist.
"""
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from regrad_jax.baselines import common
from regrad_jax.baselines import cpt
from regrad_jax.model import lora as lora_lib
from regrad_jax.model import losses

TARGETS = ("gate", "up", "down")


def train_adapters(params, init, tokens, mask, *, config, lora_config, lr: float,
                   steps: int):
  """Trains one LoRA per document, all from `init`, for `steps` AdamW steps.

  Args:
    params: frozen base params.
    init: a plain LoRA tree (leaves (n, ...)), shared starting point.
    tokens, mask: (D, S) documents (an all-False row trains a no-op adapter).
  Returns:
    (batched LoRA tree with leaves (n, D, ...), (D,) final losses, (D,) initial
    losses).
  """
  D = tokens.shape[0]
  lora = jax.tree.map(lambda x: jnp.repeat(x[:, None], D, axis=1), init)
  tx = optax.adamw(lr, weight_decay=0.0)

  def loss(lora):
    per_doc = losses.lm_loss(params, lora, tokens, mask, config=config,
                             lora_config=lora_config)
    return jnp.sum(per_doc), per_doc  # Sum: each adapter gets its own gradient.

  def body(_, carry):
    lora, opt_state, _ = carry
    (_, per_doc), grads = jax.value_and_grad(loss, has_aux=True)(lora)
    updates, opt_state = tx.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, per_doc

  first = loss(lora)[1]
  lora, _, _ = jax.lax.fori_loop(0, steps, body, (lora, tx.init(lora), first))
  return lora, loss(lora)[1], first


def concat_adapters(adapters: Sequence[dict], k: int) -> dict:
  """PEFT "cat" combination of up to k adapters (numpy, leaves (n, ...)).

  A: (n, d_in, r) x k -> (n, d_in, k r); B: (n, r, d_out) x k -> (n, k r, d_out).
  With the LoRA scale kept at alpha / r, the result applies sum_k scale A_k B_k.
  Fewer than k adapters are completed with zeros (no contribution).
  """
  if not adapters or len(adapters) > k:
    raise ValueError(f"concat_adapters: need 1..{k} adapters, got {len(adapters)}")
  zero = jax.tree.map(np.zeros_like, adapters[0])
  full = list(adapters) + [zero] * (k - len(adapters))
  return {name: {"a": np.concatenate([x[name]["a"] for x in full], axis=-1),
                 "b": np.concatenate([x[name]["b"] for x in full], axis=-2)}
          for name in adapters[0]}


class PRAG:
  """Per-document LoRAs, merged for the top-K retrieved documents of a query.

  Args:
    model: the base model (loaders.Model) (never modified).
    retriever: the retrieval.Retriever shared with RAG / ReGrad.
    documents: documents already in the retriever (more through `inject`).
    config: reads eval.prag_rank, prag_alpha, prag_lr, prag_steps,
      prag_batch_size; adapt.k, adapt.batch_size, adapt.max_new_tokens;
      data.max_context_len, data.doc_buckets; seed.
  Attributes:
    adapters: doc id -> its trained LoRA (numpy leaves (n, ...)).
    train_losses: doc id -> (loss before, loss after) training.
  """
  name = "prag"

  def __init__(self, model, retriever, documents, config, *, k: int | None = None):
    ec = config.eval
    self.params, model_cfg, self.tokenizer = model
    self.model_cfg = model_cfg
    self.retriever = retriever
    self.k = int(config.adapt.k if k is None else k)
    self.rank, self.alpha = int(ec.prag_rank), float(ec.prag_alpha)
    self.lr, self.steps = float(ec.prag_lr), int(ec.prag_steps)
    self.train_batch = int(ec.prag_batch_size)
    self.max_len = int(config.data.max_context_len)
    self.doc_buckets = tuple(config.data.doc_buckets)
    self.batch_size = int(config.adapt.batch_size)
    self.max_new_tokens = int(config.adapt.max_new_tokens)
    self.lora_config = lora_lib.LoraConfig(
        rank=self.rank, alpha=self.alpha, start=0, stop=model_cfg.n_layers,
        targets=TARGETS)
    # The merged adapter has rank k * r; alpha scales with it so the per-
    # adapter scale stays alpha / r.
    self.merged_config = lora_lib.LoraConfig(
        rank=self.k * self.rank, alpha=self.k * self.alpha, start=0,
        stop=model_cfg.n_layers, targets=TARGETS)
    self.init = lora_lib.init_lora(jax.random.key(config.seed), model_cfg,
                                   self.lora_config)
    self.text = {d.id: d.text for d in documents}
    self.adapters: dict[str, dict] = {}
    self.train_losses: dict[str, tuple[float, float]] = {}
    self.last_doc_ids: list[list[str]] = []
    self._train = jax.jit(functools.partial(
        train_adapters, config=model_cfg, lora_config=self.lora_config,
        lr=self.lr, steps=self.steps))

  def inject(self, documents: Sequence) -> None:
    """Indexes new documents; their adapters are trained when first retrieved."""
    known = set(self.retriever.ids)
    new = [d for d in documents if d.id not in known]
    if new:
      self.retriever.add(new)
    self.text.update({d.id: d.text for d in documents})

  def train(self, doc_ids: Sequence[str]) -> None:
    """Trains (once) the adapters of the given documents."""
    todo = list(dict.fromkeys(i for i in doc_ids if i not in self.adapters))
    if not todo:
      return
    missing = [i for i in todo if i not in self.text]
    if missing:
      raise KeyError(f"PRAG has no text for documents {missing[:3]}")
    ids = cpt.encode_documents(self.tokenizer, [self.text[i] for i in todo],
                               self.max_len)
    start = 0
    for tokens, mask in tqdm(cpt.doc_batches(ids, self.train_batch, self.doc_buckets,
                                             self.tokenizer.pad_id),
                             total=-(-len(ids) // self.train_batch),
                             desc="prag adapters", leave=False):
      lora, after, before = jax.device_get(self._train(self.params, self.init,
                                                       tokens, mask))
      for j, doc_id in enumerate(todo[start:start + self.train_batch]):
        self.adapters[doc_id] = jax.tree.map(lambda x: np.asarray(x[:, j]), lora)
        self.train_losses[doc_id] = (float(before[j]), float(after[j]))
      start += self.train_batch

  def answer(self, questions: Sequence[str]) -> list[str]:
    hits, _ = self.retriever.search(list(questions), self.k)
    self.last_doc_ids = [list(row) for row in hits]
    self.train([i for row in self.last_doc_ids for i in row])

    def lora_for_rows(rows):  # Leaves (n, Q, ...): each row its own adapter.
      # Merged per batch, not for every question up front: host memory holds
      # one adapter per document plus one batch of merged ones (SmolLM2, r=2:
      # 1.5 MB per document, 4.6 MB per merged K=3 adapter).
      merged = [concat_adapters([self.adapters[i] for i in self.last_doc_ids[r]],
                                self.k) for r in rows]
      return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs, axis=1)), *merged)

    ids = common.qa_prompt_ids(self.tokenizer, questions)
    return common.generate_answers(
        self.params, ids, self.tokenizer, config=self.model_cfg,
        batch_size=self.batch_size,
        max_new_tokens=self.max_new_tokens, lora_config=self.merged_config,
        lora_for_rows=lora_for_rows, desc=self.name)

  def generic_params(self) -> dict:
    return self.params
