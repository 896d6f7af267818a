"""Online adaptation: batched per-query adapters, reversibility, engine errors."""
import jax
import numpy as np
import pytest

from configs import tiny
from regrad_jax import fingerprint, prompts
from regrad_jax.adapt import ReGrad
from regrad_jax.data import tiny as tiny_data
from regrad_jax.data.records import Document
from regrad_jax.meta import objective, state as state_lib
from regrad_jax.model import LoraConfig, decode, init_lora, lora as lora_lib, loaders
from regrad_jax.model import generation, transformer

CONFIG = tiny.get_config()
CONFIG.bank.codec = "fp32"
CONFIG.bank.batch_size = 4
CONFIG.retrieval.backend = "bm25"  # Deterministic and text-based: exact matches.
CONFIG.adapt.k, CONFIG.adapt.max_new_tokens, CONFIG.adapt.batch_size = 2, 6, 4


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
  """ReGrad.from_config over a knowledge base of the tiny test split, at a
  random theta* (perturbed so that B != 0) saved as WORKDIR/meta_state."""
  model = loaders.load_model(CONFIG.model)
  lcfg = LoraConfig.from_config(CONFIG.lora, model.config)
  theta = init_lora(jax.random.key(1), model.config, lcfg)
  theta = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape),
                       theta)
  workdir = tmp_path_factory.mktemp("w")
  state_lib.save(workdir / "meta_state", theta, objective.init_alpha(theta, "tie", 0.5),
                 {"lora": state_lib.lora_info(lcfg),
                  "base_fingerprint": fingerprint.tree_fingerprint(model.params),
                  "tokenizer_fingerprint": model.tokenizer.fingerprint()})
  docs, _ = tiny_data.tiny_splits()["test"]
  return ReGrad.from_config(CONFIG, workdir, model=model, documents=docs)


def test_from_config_builds_the_knowledge_base_then_loads_it_read_only(engine):
  docs, _ = tiny_data.tiny_splits()["test"]
  assert set(engine.kb.documents) == {d.id for d in docs} == set(engine.retriever.ids)
  assert (engine.k, engine.max_new_tokens, engine.batch_size) == (2, 6, 4)
  again = ReGrad.load(engine.kb.workdir, CONFIG)
  assert set(again.bank.ids) == set(engine.bank.ids)
  assert again.meta.lora_config == engine.meta.lora_config
  # A subset: the knowledge base then holds exactly it (the rest removed).
  sub = ReGrad.from_config(CONFIG, engine.kb.workdir, model=engine.model,
                           documents=docs[:3])
  assert set(sub.kb.documents) == {d.id for d in docs[:3]} == set(sub.retriever.ids)
  engine.kb.add(docs, engine.computer, engine.chunking)  # Restored for the other tests.
  engine._follow_kb()  # pylint: disable=protected-access
  assert set(engine.retriever.ids) == {d.id for d in docs}


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
  (params, mcfg, _), m = engine.model, engine.meta
  lora = objective.batched_adapt(m.theta, m.alpha, sums, 1.0)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
  out = transformer.apply(params, tokens, config=mcfg, lora=lora, lora_config=m.lora_config)
  for q in range(2):
    one = objective.adapt(m.theta, m.alpha, jax.tree.map(lambda x: x[q], sums), 1.0)
    merged = lora_lib.merge_into_base(params, one, m.lora_config)
    ref = transformer.apply(merged, tokens[q:q + 1], config=mcfg)
    np.testing.assert_allclose(out[q], ref[0], atol=2e-5)


def test_weights_bitwise_unchanged_after_100_queries(engine):
  state = lambda: (engine.model.params, engine.meta.theta, engine.meta.alpha)
  before = jax.tree.map(lambda x: np.array(x, copy=True), state())
  qs = (_questions() * 7)[:100]
  results = engine.answer(qs)
  assert len(results) == 100
  after = state()
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    assert np.array_equal(a, np.asarray(b))


def test_gamma_zero_is_the_unadapted_model(engine):
  q = _questions()[:4]
  adapted0 = [r.answer for r in engine.answer(q, gamma=0.0)]
  (params, mcfg, tok), m = engine.model, engine.meta
  tokens, mask = generation.encode_prompts(tok, [prompts.qa_prompt(x, tok) for x in q])
  out = decode.generate(params, tokens, mask, config=mcfg, lora=m.theta,
                        lora_config=m.lora_config, max_new_tokens=6)
  assert adapted0 == [tok.decode(r).strip() for r in np.asarray(out)]


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


def test_icl_prompts_cut_each_passage_as_rag_does(engine, monkeypatch):
  tok, doc = engine.model.tokenizer, engine.bank.ids[0]
  monkeypatch.setattr(engine, "icl_max_tokens", 10)
  icl, = engine.prompts(["Q?"], [[doc]], "icl")
  cut = prompts.truncate_text(tok, engine.texts[doc], 10)
  assert len(tok.encode(cut)) == 10 and cut in icl and engine.texts[doc] not in icl
  assert engine.prompts(["Q?"], [[doc]], "blind") == [prompts.qa_prompt("Q?", tok)]


def test_inject_and_remove_keep_bank_and_index_in_sync(engine):
  doc = Document("new-fact", "The river Oxlen flows into the lake Parmit.")
  engine.inject([doc])
  assert "new-fact" in engine.bank.ids and "new-fact" in engine.retriever.ids
  top = engine.answer(["Where does the river Oxlen flow?"], k=1)[0]
  assert top.doc_ids == ("new-fact",)
  engine.remove(["new-fact"])
  assert "new-fact" not in engine.bank.ids and "new-fact" not in engine.retriever.ids
