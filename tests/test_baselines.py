"""Baselines on the tiny model: Direct, RAG, CPT (full and LoRA), PRAG, fine-tuned
RAG / Direct, Instruction CPT."""
import jax
import numpy as np
import pytest

from configs import tiny
from regrad_jax import baselines
from regrad_jax import data as data_lib
from regrad_jax import metrics
from regrad_jax import prompts
from regrad_jax import retrieval
from regrad_jax.baselines import finetuned
from regrad_jax.baselines import icpt as icpt_lib
from regrad_jax.baselines import prag as prag_lib
from regrad_jax.eval import drift
from regrad_jax.model import loaders, lora as lora_lib


@pytest.fixture(scope="module")
def setup():
  c = tiny.get_config()
  c.retrieval.backend = "brute"
  c.eval.cpt_lr = 3e-3  # A few steps must visibly lower the loss of a random model.
  c.eval.cpt_lora_lr = 3e-2
  c.eval.cpt_epochs = 3
  c.eval.prag_lr = 3e-2
  c.eval.prag_steps = 5
  c.eval.prag_batch_size = 4
  params, model_cfg, tok = loaders.load_model(c.model)
  docs, records = data_lib.load_split(c, "dev")
  return c, params, model_cfg, tok, docs[:4], records[:4]


def _snapshot(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _assert_same(tree, snap):
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(snap)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_direct_gives_well_formed_metrics(setup):
  c, params, model_cfg, tok, _, records = setup
  method = baselines.Direct(loaders.Model(params, model_cfg, tok), c)
  preds = method.answer([r.question for r in records])
  assert len(preds) == len(records) and all(isinstance(p, str) for p in preds)
  result = metrics.aggregate(preds, [r.answers for r in records])
  assert set(result) == {"em", "f1", "acc", "n"} and result["n"] == len(records)
  assert 0.0 <= result["f1"] <= 100.0
  assert method.generic_params() is params


@pytest.mark.parametrize("use_lora", [False, True])
def test_cpt_changes_weights_and_lowers_loss(setup, use_lora):
  c, params, model_cfg, tok, docs, records = setup
  base = _snapshot(params)
  method = baselines.CPT(loaders.Model(params, model_cfg, tok), c, lora=use_lora)
  before = method.lm_loss(docs) if not use_lora else None
  method.inject(docs[:2])  # A stream: two arrivals, one optimiser state.
  method.inject(docs[2:])
  assert method.steps == 2 * c.eval.cpt_epochs
  if use_lora:  # Epochs over the same batch (LoRA: no extra loss compile).
    losses = [v for _, v in method.history]
    assert losses[c.eval.cpt_epochs - 1] < losses[0] - 0.05, losses
  else:
    after = method.lm_loss(docs)
    assert after < before - 0.05, (before, after)
  assert drift.weight_l2(method.generic_params(), params) > 0.0
  _assert_same(params, base)  # The base weights are copied, never trained.
  if not use_lora:  # (The LoRA decoder is another compile; PRAG covers it.)
    assert len(method.answer([r.question for r in records])) == len(records)
  with pytest.raises(ValueError, match="doc_buckets"):
    bad = tiny.get_config()
    bad.data.doc_buckets = (32,)
    baselines.CPT(loaders.Model(params, model_cfg, tok), bad)


def test_rag_retrieves_and_indexes_only_new_documents(setup):
  c, params, model_cfg, tok, docs, records = setup
  retriever = retrieval.Retriever.build(c, docs[:2])
  method = baselines.RAG(loaders.Model(params, model_cfg, tok), retriever, docs[:2], c, k=2)
  method.inject(docs)  # Two known, two new.
  assert sorted(retriever.ids) == sorted(d.id for d in docs)
  preds = method.answer([r.question for r in records])
  assert len(preds) == len(records)
  assert [len(row) for row in method.last_doc_ids] == [2] * len(records)
  assert all(i in method.text for row in method.last_doc_ids for i in row)
  # Prompts carry the passages, cut to max_context_len tokens.
  ids = baselines.qa_prompt_ids(tok, ["Q?"], [["alpha beta"]])
  assert b"alpha beta" in bytes(x for x in ids[0] if x < 256)
  assert prompts.truncate_text(tok, "alpha beta", 5) == "alpha"
  assert prompts.truncate_text(tok, "alpha", 5) == "alpha"
  assert method.generic_params() is params


def test_prag_cat_merge_equals_sum_of_deltas(setup):
  c, params, model_cfg, tok, _, _ = setup
  lcfg = lora_lib.LoraConfig(rank=2, alpha=32.0, start=0, stop=model_cfg.n_layers,
                             targets=prag_lib.TARGETS)
  adapters = []
  rng = np.random.default_rng(0)
  for _ in range(2):  # Both A and B nonzero, so each adapter changes the weights.
    adapters.append(jax.tree.map(
        lambda x: rng.standard_normal(x.shape, np.float32) * np.float32(0.05),
        jax.eval_shape(lambda k: lora_lib.init_lora(k, model_cfg, lcfg), jax.random.key(0))))
  merged_cfg = lora_lib.LoraConfig(rank=6, alpha=96.0, start=0,
                                   stop=model_cfg.n_layers, targets=prag_lib.TARGETS)
  cat = prag_lib.concat_adapters(adapters, k=3)  # Third slot: zero padding.
  assert cat["gate"]["a"].shape[-1] == 6
  # The merged adapter's weight update is the sum of the two adapters' updates.
  got = lora_lib.merge_into_base(params, cat, merged_cfg)
  want = lora_lib.merge_into_base(lora_lib.merge_into_base(params, adapters[0], lcfg),
                                  adapters[1], lcfg)
  for name in prag_lib.TARGETS:
    np.testing.assert_allclose(np.asarray(got["layers"][name]),
                               np.asarray(want["layers"][name]), atol=1e-6)
  with pytest.raises(ValueError, match="adapters"):
    prag_lib.concat_adapters(adapters, k=1)


def test_prag_trains_adapters_of_retrieved_documents(setup):
  c, params, model_cfg, tok, docs, records = setup
  base = _snapshot(params)
  retriever = retrieval.Retriever.build(c, docs)
  method = baselines.PRAG(loaders.Model(params, model_cfg, tok), retriever, docs, c, k=2)
  preds = method.answer([r.question for r in records])
  assert len(preds) == len(records)
  retrieved = {i for row in method.last_doc_ids for i in row}
  assert set(method.adapters) == retrieved  # Lazy: only what was retrieved.
  for before, after in method.train_losses.values():
    assert after < before, (before, after)
  _assert_same(params, base)
  assert method.generic_params() is params


class _StubEngine:
  """Records what a ReGradMethod sends the engine (the engine has its own tests)."""

  def __init__(self, known):
    self.kb = type("KB", (), {"documents": dict.fromkeys(known, "text")})()
    self.model = loaders.Model({"w": np.zeros(2)}, None, None)
    self.injected = []

  def inject(self, documents):
    self.injected += [d.id for d in documents]
    self.kb.documents.update({d.id: d.text for d in documents})

  def answer(self, questions, k, mode):
    return [type("R", (), {"answer": f" {mode}{k} ", "doc_ids": ("a",)})()
            for _ in questions]


def test_regrad_view_injects_once(setup):
  _, _, _, _, docs, _ = setup
  engine = _StubEngine(known=[docs[0].id])
  blind = baselines.ReGradMethod(engine, mode="blind", k=2)
  icl = baselines.ReGradMethod(engine, mode="icl", k=2)
  blind.inject(docs)
  icl.inject(docs)  # Shared engine: nothing left to compute.
  assert engine.injected == [d.id for d in docs[1:]]
  assert icl.answer(["q1", "q2"]) == ["icl2", "icl2"]
  assert blind.name == "regrad" and icl.name == "regrad_icl"
  assert icl.last_doc_ids == [["a"], ["a"]]
  assert blind.generic_params() is engine.model.params
  with pytest.raises(ValueError, match="mode"):
    baselines.ReGradMethod(engine, mode="nope")


@pytest.fixture(scope="module")
def fine_tuned(setup, tmp_path_factory):
  """The rag_ft adapter trained for 8 steps (32 training tasks) and saved."""
  c, params, model_cfg, tok, _, _ = setup
  c = c.copy_and_resolve_references()
  c.eval.ft_steps, c.eval.ft_lr = 8, 3e-2
  path = tmp_path_factory.mktemp("ft") / "rag_ft"
  info = finetuned.train_and_save(c, path, loaders.Model(params, model_cfg, tok), "rag_ft")
  return c, path, info


def _answer_loss(c, params, model_cfg, tok, lora, lcfg, method):
  """Mean answer loss of the first 8 training tasks of `method`'s mode."""
  from regrad_jax.baselines.finetuned import MODES
  from regrad_jax.meta import tasks as tasks_lib
  from regrad_jax.model import losses
  docs, recs = data_lib.load_split(c, "train")
  tasks = tasks_lib.build_tasks(recs[:8], docs, tok, k=c.meta.k, mode=MODES[method],
                                max_context_len=c.data.max_context_len)
  b = tasks_lib.collate(tasks, doc_buckets=c.data.doc_buckets,
                        qa_buckets=c.data.qa_buckets, pad_id=tok.pad_id)
  return float(np.mean(losses.answer_loss(params, lora, b["qa_tokens"], b["qa_mask"],
                                          b["target_mask"], config=model_cfg,
                                          lora_config=lcfg)))


def test_fine_tuned_rag_trains_saves_and_refuses_other_bases(setup, fine_tuned):
  c, params, model_cfg, tok, docs, records = setup
  c, path, info = fine_tuned
  base = _snapshot(params)
  assert info["tasks"] == 32 and info["mode"] == "icl"
  assert len((path / "train_metrics.jsonl").read_text().splitlines()) == 8
  lora, lcfg, loaded = finetuned.load_adapter(path, loaders.Model(*setup[1:4]), method="rag_ft")
  assert lcfg == lora_lib.LoraConfig.from_config(c.lora, model_cfg)  # theta*'s layout.
  assert loaded["base_fingerprint"] == info["base_fingerprint"]
  # Trained: the answer loss on training tasks drops well below the base model's.
  before = _answer_loss(c, params, model_cfg, tok, None, None, "rag_ft")
  after = _answer_loss(c, params, model_cfg, tok, lora, lcfg, "rag_ft")
  assert after < before - 0.1, (before, after)
  # It answers with RAG's retriever and K; its generic weights carry the LoRA.
  retriever = retrieval.Retriever.build(c, docs)
  method = baselines.FineTunedRAG(loaders.Model(params, model_cfg, tok), retriever, docs, c,
                                  lora=lora, lora_config=lcfg, k=2)
  rag = baselines.RAG(loaders.Model(params, model_cfg, tok), retriever, docs, c, k=2)
  questions = [r.question for r in records]
  preds, raw = method.answer(questions), rag.answer(questions)
  assert method.last_doc_ids == rag.last_doc_ids
  assert preds != raw  # The adapter changes the answers.
  assert drift.weight_l2(method.generic_params(), params) > 0.0
  _assert_same(params, base)
  # Refused: other base weights, or another method's adapter.
  other = {**params, "embed": np.asarray(params["embed"]) + np.float32(1e-3)}
  with pytest.raises(ValueError, match="base_fingerprint"):
    finetuned.load_adapter(path, loaders.Model(other, model_cfg, tok))
  with pytest.raises(ValueError, match="direct_ft"):
    finetuned.load_adapter(path, loaders.Model(*setup[1:4]), method="direct_ft")
  with pytest.raises(FileNotFoundError, match="fine-tuned adapter"):
    finetuned.load_adapter(path.parent / "nothing", loaders.Model(*setup[1:4]))


def test_fine_tuned_trains_on_the_meta_trainers_tasks(setup):
  c, *_ = setup
  from regrad_jax.meta import trainer
  c = c.copy_and_resolve_references()
  assert finetuned.budget(c) == (c.meta.num_steps, c.meta.batch_size)  # 0: the meta's.
  c.eval.ft_steps, c.eval.ft_batch_size = 3, 2
  order = finetuned.task_order(c, 64)
  assert order.shape == (3, 2)
  np.testing.assert_array_equal(order[2], trainer.batch_indices(c.seed, 2, 2, 64))
  c.eval.ft_lr = 0.0  # Blind tasks: prompts without passages; a zero step keeps B = 0.
  lora, _, history = finetuned.train_adapter(c, loaders.Model(*setup[1:4]), "direct_ft")
  assert len(history) == 3
  assert all(not np.any(x) for x in jax.tree.leaves({k: v["b"] for k, v in lora.items()}))
  with pytest.raises(ValueError, match="fine-tuned baseline"):
    finetuned.train_adapter(c, loaders.Model(*setup[1:4]), "nope")


def test_icpt_mixes_qa_pairs_and_trains_full_weights(setup):
  c, params, model_cfg, tok, docs, _ = setup
  base = _snapshot(params)
  method = baselines.ICPT(loaders.Model(params, model_cfg, tok), c)
  assert method.name == "icpt"
  method.inject(docs[:2])  # 2 documents + 2 QA pairs: one batch per epoch.
  method.inject(docs[2:3])
  assert method.qa_used == 3 and method.steps == 2 * c.eval.cpt_epochs
  losses = [v for _, v in method.history]
  assert losses[c.eval.cpt_epochs - 1] < losses[0] - 0.05, losses
  assert drift.weight_l2(method.generic_params(), params) > 0.0
  _assert_same(params, base)
  # A QA pair's prompt is masked; a document's tokens are all predicted.
  qa = icpt_lib.qa_items(tok, method_records := data_lib.load_split(c, "train")[1][:1])
  ids, n_prompt = qa[0]
  assert ids[-1] == tok.eos_id and 0 < n_prompt < len(ids)
  tokens, mask, target = next(icpt_lib.item_batches(qa + [([5, 6, 7], 0)], 4, (64, 128),
                                                    tok.pad_id))
  assert tokens.shape == (4, 64)
  assert not target[0, :n_prompt].any() and target[0, n_prompt:len(ids)].all()
  assert target[1, :3].all() and not target[2:].any()
  assert method_records[0].answers[0] in tok.decode(ids[n_prompt:])
