"""Online adaptation: batched per-query adapters, reversibility, engine errors."""
import jax
import numpy as np
import pytest

from configs import tiny
from regrad_jax import prompts
from regrad_jax.adapt import ReGrad
from regrad_jax.bank import bank as bank_lib, codecs, compute
from regrad_jax.data import tiny as tiny_data
from regrad_jax.data.records import Document
from regrad_jax.meta import objective
from regrad_jax.model import LoraConfig, decode, init_lora, lora as lora_lib, loaders
from regrad_jax.model import sampling, transformer
from regrad_jax.retrieval import retriever as retriever_lib

CONFIG = tiny.get_config()
CONFIG.bank.codec = "fp32"
CONFIG.retrieval.backend = "bm25"  # Deterministic and text-based: exact matches.


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
  params, mcfg, tok = loaders.load_model(CONFIG.model)
  lcfg = LoraConfig.from_config(CONFIG.lora, mcfg)
  theta = init_lora(jax.random.key(1), mcfg, lcfg)
  theta = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape),
                       theta)
  alpha = objective.init_alpha(theta, "tie", 0.5)
  docs, _ = tiny_data.tiny_splits()["test"]
  computer = compute.GradientComputer(
      params, theta, model_config=mcfg, lora_config=lcfg, tokenizer=tok,
      codec=codecs.make("fp32"), max_len=CONFIG.data.max_context_len,
      buckets=CONFIG.data.doc_buckets, batch_size=4)
  bank = bank_lib.Bank.open_for(tmp_path_factory.mktemp("w") / "bank", computer)
  bank.build(docs, computer)
  retriever = retriever_lib.Retriever.build(CONFIG, docs)
  return ReGrad(params, mcfg, tok, theta, alpha, lcfg, bank, retriever,
                {d.id: d.text for d in docs}, computer, k=2, max_new_tokens=6,
                batch_size=4)


def _questions():
  return [r.question for r in tiny_data.tiny_splits()["test"][1]]


def test_batched_answers_equal_one_at_a_time(engine):
  qs = _questions()[:5]  # 5 queries: one full batch of 4 and one padded batch.
  batched = engine.answer(qs)
  single = [engine.answer([q])[0] for q in qs]
  assert [r.answer for r in batched] == [r.answer for r in single]
  assert all(len(r.doc_ids) == 2 and len(r.scores) == 2 for r in batched)


def test_per_query_adapter_equals_merged_weights(engine):
  """The batched-LoRA forward equals, per query, the forward of merged weights."""
  ids = [[i for i in engine.bank.ids][:2], [i for i in engine.bank.ids][2:4]]
  sums = engine.bank.gather_sum(ids)
  lora = objective.batched_adapt(engine.theta, engine.alpha, sums, 1.0)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
  out = transformer.apply(engine.params, tokens, config=engine.model_config, lora=lora,
                          lora_config=engine.lora_config)
  for q in range(2):
    one = objective.adapt(engine.theta, engine.alpha,
                          jax.tree.map(lambda x: x[q], sums), 1.0)
    merged = lora_lib.merge_into_base(engine.params, one, engine.lora_config)
    ref = transformer.apply(merged, tokens[q:q + 1], config=engine.model_config)
    np.testing.assert_allclose(out[q], ref[0], atol=2e-5)


def test_weights_bitwise_unchanged_after_100_queries(engine):
  before = jax.tree.map(lambda x: np.array(x, copy=True), (engine.params, engine.theta,
                                                           engine.alpha))
  qs = (_questions() * 7)[:100]
  results = engine.answer(qs)
  assert len(results) == 100
  after = (engine.params, engine.theta, engine.alpha)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    assert np.array_equal(a, np.asarray(b))


def test_gamma_zero_is_the_unadapted_model(engine):
  q = _questions()[:4]
  adapted0 = [r.answer for r in engine.answer(q, gamma=0.0)]
  tokens, mask = sampling.encode_prompts(
      engine.tokenizer, [prompts.qa_prompt(x, engine.tokenizer) for x in q])
  out = decode.generate(engine.params, tokens, mask, config=engine.model_config,
                        lora=engine.theta, lora_config=engine.lora_config,
                        max_new_tokens=6)
  assert adapted0 == [engine.tokenizer.decode(r).strip() for r in np.asarray(out)]


def test_errors_and_edge_cases(engine):
  with pytest.raises(ValueError, match="[Ee]mpty"):
    engine.answer(["  "])
  with pytest.raises(TypeError):
    engine.answer("a single string")
  # K larger than the bank: every document, once.
  r = engine.answer(_questions()[:1], k=1000)[0]
  assert len(r.doc_ids) == len(engine.bank.ids) == len(set(r.doc_ids))
  # An index entry with no gradient in the bank is refused, naming the id.
  engine.retriever.add([Document("ghost", "Ghost town facts about Velmora capital.")])
  try:
    with pytest.raises(KeyError, match="ghost"):
      engine.answer(["What is the capital of Velmora?"], k=1000)
  finally:
    engine.retriever.remove(["ghost"])


def test_inject_and_remove_keep_bank_and_index_in_sync(engine):
  doc = Document("new-fact", "The river Oxlen flows into the lake Parmit.")
  engine.inject([doc])
  assert "new-fact" in engine.bank.ids and "new-fact" in engine.retriever.ids
  top = engine.answer(["Where does the river Oxlen flow?"], k=1)[0]
  assert top.doc_ids == ("new-fact",)
  engine.remove(["new-fact"])
  assert "new-fact" not in engine.bank.ids and "new-fact" not in engine.retriever.ids
