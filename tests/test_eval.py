"""Drift measurement, report formatting, the evaluation and injection drivers (tiny)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from regrad_jax import adapt
from regrad_jax.data.records import QARecord
from regrad_jax.eval import drift, evaluate, injection, report
from regrad_jax.meta import objective, state as state_lib
from regrad_jax.model import loaders, lora as lora_lib, losses, transformer

FIELDS = ("em", "f1", "acc", "n", "ppl_general", "ppl_wiki", "probe_acc", "weight_l2")


@pytest.fixture(scope="module")
def model():
  c = tiny.get_config()
  return loaders.load_model(c.model)


def test_weight_l2():
  a = {"w": jnp.ones((3, 4)), "v": {"b": jnp.zeros((2,))}}
  assert drift.weight_l2(a, a) == 0.0
  b = {"w": jnp.ones((3, 4)), "v": {"b": jnp.array([3.0, 4.0])}}
  assert drift.weight_l2(b, a) == pytest.approx(5.0)
  with pytest.raises(ValueError, match="shape"):
    drift.weight_l2({"w": jnp.ones((4, 3)), "v": {"b": jnp.zeros((2,))}}, a)
  with pytest.raises(ValueError, match="structure"):
    drift.weight_l2({"w": jnp.ones((3, 4))}, a)


def test_windows_predict_every_token_once():
  ids = list(range(10))
  wins = drift.windows(ids, 4)
  assert wins == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
  predicted = [t for w in wins for t in w[1:]]
  assert predicted == ids[1:]
  assert drift.windows([5], 4) == []
  with pytest.raises(ValueError, match="window"):
    drift.windows(ids, 1)


def test_perplexity_is_exact(model):
  params, cfg, tok = model
  texts = ["The old farmer went to market.", "A tired man ran"]
  # 31 and 16 tokens: at window 16, windows of exactly 16 tokens (one jit shape).
  assert [len(tok.encode(t, add_bos=True)) for t in texts] == [31, 16]
  apply = jax.jit(transformer.apply, static_argnames="config")

  def manual(window):
    total, count = 0.0, 0
    for t in texts:
      for w in drift.windows(tok.encode(t, add_bos=True), window):
        logits = apply(params, jnp.asarray([w], jnp.int32), config=cfg)
        total += float(jnp.sum(losses.token_nll(logits[:, :-1],
                                                jnp.asarray([w[1:]], jnp.int32))))
        count += len(w) - 1
    return math.exp(total / count)

  for window in (64, 16):  # Whole texts, then cut into overlapping windows.
    got = drift.perplexity(params, texts, tok, config=cfg, window=window, batch_size=4)
    assert got == pytest.approx(manual(window), rel=1e-4)
  with pytest.raises(ValueError, match="no texts"):
    drift.perplexity(params, [], tok, config=cfg)


def test_probe_hit_rule():
  assert drift.probe_hit(" Paris, the city of light", ["Paris"])
  assert drift.probe_hit(" the beautiful Paris", ["Paris"])  # Within w + 2 words.
  assert not drift.probe_hit(" a city in the north of France called Paris", ["Paris"])
  assert not drift.probe_hit(" London\nParis", ["Paris"])  # First line only.
  assert drift.probe_hit(" New York City", ["Boston", "New York"])
  assert not drift.probe_hit("", ["Paris"])


def test_drift_data_refuses_overlap_with_bank():
  c = tiny.get_config()
  data = drift.load_drift_data(c)
  assert len(data.general) == len(data.wiki) == c.eval.num_ppl_docs
  assert len(data.probe) == c.eval.num_probe
  from regrad_jax.data import tiny as tiny_data
  held_out = tiny_data.tiny_distractors(-1)[-1].id
  with pytest.raises(ValueError, match="held-out"):
    drift.load_drift_data(c, corpus_ids=[held_out])


def test_report_tables_and_plot(tmp_path):
  figs = {"em": 10.0, "f1": 20.5, "n": 8, "ppl_general": 12.3, "ppl_wiki": 9.87,
          "probe_acc": 50.0, "weight_l2": 0.0}
  table = report.results_table({"regrad": figs, "cpt": {**figs, "weight_l2": 1.5}})
  lines = table.splitlines()
  assert len(lines) == 4 and "ReGrad" in lines[2] and "20.5" in lines[2]
  assert "| acc |" in lines[0] and "| - |" in lines[2]  # No acc figure: a dash.
  curve = {"docs": [4, 8], "methods": {"regrad": [figs, figs],
                                       "cpt": [figs, {**figs, "f1": 5.0}]}}
  assert len(report.injection_table(curve).splitlines()) == 2 + 4
  png = report.plot_injection(curve, tmp_path / "x" / "curve.png")
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="no methods"):
    report.results_table({})


def _meta_state(path, c, params, cfg, tok):
  """An (un-meta-learned) state: theta with a nonzero B so gradients move it."""
  lcfg = lora_lib.LoraConfig.from_config(c.lora, cfg)
  theta = lora_lib.init_lora(jax.random.key(0), cfg, lcfg)
  rng = np.random.default_rng(1)  # NumPy noise: no per-shape compiles.
  theta = jax.tree.map(lambda x: np.asarray(x) + np.float32(0.02) * rng.standard_normal(
      x.shape, np.float32), theta)
  alpha = objective.init_alpha(theta, "tie", 0.5)
  state_lib.save(path, theta, alpha, {
      "lora": {"rank": lcfg.rank, "alpha": lcfg.alpha, "start": lcfg.start,
               "stop": lcfg.stop, "targets": list(lcfg.targets)},
      "base_fingerprint": loaders.base_fingerprint(params),
      "tokenizer_fingerprint": tok.fingerprint(), "step": 0})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, model):
  params, cfg, tok = model
  wd = tmp_path_factory.mktemp("eval")
  c = tiny.get_config()
  _meta_state(wd / "meta_state", c, params, cfg, tok)
  return wd


def _config(methods):
  c = tiny.get_config()
  c.retrieval.backend = "brute"
  c.eval.methods = methods
  c.eval.num_questions = 8
  c.eval.cpt_lr = 3e-3
  return c


def test_evaluate_end_to_end(workdir):
  c = _config(("direct", "cpt", "regrad"))
  out = evaluate.run(c, workdir)
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["methods"] == out["methods"] and saved["complete"]
  for name, figs in saved["methods"].items():
    assert set(FIELDS) <= set(figs), name
    assert figs["n"] == 8 and 0.0 <= figs["f1"] <= 100.0
  m = saved["methods"]
  # Zero drift by construction: ReGrad answers generic queries with the base.
  for name in ("direct", "regrad"):
    assert m[name]["weight_l2"] == 0.0
    assert m[name]["ppl_general"] == m["direct"]["ppl_general"]
  assert m["cpt"]["weight_l2"] > 0.0
  assert m["cpt"]["ppl_general"] != m["direct"]["ppl_general"]
  assert saved["setting"]["num_documents"] == 4  # 8 questions, 2 per passage.
  preds = [json.loads(l) for l in (workdir / "predictions.jsonl").read_text().splitlines()]
  assert len(preds) == 3 * 8
  for name, figs in m.items():  # Per-question scores average to the table's.
    rows = [p for p in preds if p["method"] == name]
    for key in ("em", "f1", "acc"):
      assert figs[key] == pytest.approx(100 * np.mean([p[key] for p in rows])), key
  assert all(len(p["doc_ids"]) == 3 for p in preds if p["method"] == "regrad")
  assert "ReGrad" in (workdir / "results.md").read_text()
  # It leaves a knowledge base of exactly its corpus, which launch.answer serves.
  served = adapt.ReGrad.load(workdir, c)
  assert len(served.kb.documents) == 4 == len(served.retriever.ids)
  first = next(p for p in preds if p["method"] == "regrad")
  assert served.answer([first["question"]])[0].answer.strip() == first["prediction"]


def test_a_run_that_dies_keeps_the_methods_it_measured(tmp_path, monkeypatch):
  make = evaluate.make_method

  def fail_on_cpt(name, **kw):
    if name == "cpt":
      raise RuntimeError("killed")
    return make(name, **kw)

  monkeypatch.setattr(evaluate, "make_method", fail_on_cpt)
  with pytest.raises(RuntimeError, match="killed"):
    evaluate.run(_config(("direct", "cpt")), tmp_path)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert list(saved["methods"]) == ["direct"] and not saved["complete"]
  assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 8


def test_first_question_skips_the_selection_questions():
  c = _config(("direct",))
  c.eval.num_questions = -1
  _, every = evaluate.select_records(c)
  c.eval.num_questions, c.eval.first_question = 4, 3
  _, recs = evaluate.select_records(c)
  assert [r.id for r in recs] == [r.id for r in every[3:7]]
  c.eval.first_question = len(every)
  with pytest.raises(ValueError, match="first_question"):
    evaluate.select_records(c)


def test_evaluate_fine_tuned_baselines_and_icpt(workdir):
  """rag_ft / direct_ft train their adapters into WORKDIR (then reuse them)."""
  from regrad_jax.baselines import finetuned
  c = _config(("direct_ft", "rag_ft", "icpt"))
  c.eval.ft_steps = 4
  m = evaluate.run(c, workdir)["methods"]
  for name, figs in m.items():
    assert set(FIELDS) <= set(figs), name
    assert figs["n"] == 8 and 0.0 <= figs["acc"] <= 100.0
    assert figs["weight_l2"] > 0.0, name  # LoRA merged / full weights trained.
  info = workdir / "rag_ft" / "info.json"
  assert json.loads(info.read_text())["tasks"] == 4 * c.meta.batch_size
  stamp = info.stat().st_mtime_ns
  model = loaders.load_model(c.model)
  assert finetuned.ensure_adapter(c, workdir, model, "rag_ft") == info.parent
  assert info.stat().st_mtime_ns == stamp  # Loaded, not trained again.
  c.eval.direct_ft_from = str(workdir / "nowhere")  # A given path is never trained into.
  with pytest.raises(FileNotFoundError, match="fine-tuned adapter"):
    evaluate.fine_tuned_adapter(c, workdir, model, "direct_ft")
  assert not (workdir / "nowhere").exists()


def test_injection_experiment(workdir):
  c = _config(("cpt", "regrad"))
  c.eval.increments = (2, 4)
  curve = injection.run(c, workdir)
  assert curve["docs"] == [2, 4]
  cpt, regrad = curve["methods"]["cpt"], curve["methods"]["regrad"]
  assert [p["n"] for p in regrad] == [4, 8]  # Questions of all documents so far.
  assert [p["weight_l2"] for p in regrad] == [0.0, 0.0]
  assert 0.0 < cpt[0]["weight_l2"] < cpt[1]["weight_l2"]  # CPT keeps drifting.
  out = workdir / "injection"
  assert json.loads((out / "curve.json").read_text())["docs"] == [2, 4]
  assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
  assert "CPT (full)" in (out / "table.md").read_text()


def test_bad_settings_are_named():
  c = _config(("direct", "nope"))
  with pytest.raises(ValueError, match="methods"):
    evaluate.check_methods(c.eval.methods)
  with pytest.raises(ValueError, match="increasing"):
    injection.check_increments((4, 2), 10)
  with pytest.raises(ValueError, match="reaches"):
    injection.check_increments((4, 20), 10)
  recs = [QARecord("q", "Q?", ("a",), None)]
  with pytest.raises(ValueError, match="gold passages"):
    injection.document_stream([], recs)
