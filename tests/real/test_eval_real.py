"""Real evaluation: SmolLM2-135M, MiniLM, a handful of cpkc test questions, end to end.

Runs evaluate.run (what launch.evaluate and launch.quickstart call) with the
quickstart config (its seven methods, the released meta-learned state and
fine-tuned adapters) cut down to 6 test questions whose passages sit among 10
Wikipedia distractors. It checks the pipeline and the results file, not accuracy
(6 questions say little). About 6 minutes on 2 cores (with test_bank_real: 367 s
on a shared machine), most of it compiling SmolLM2 programs and full-weight CPT.
"""
import json
import math

import pytest

from configs import quickstart
from regrad_jax.eval import evaluate

pytestmark = pytest.mark.real

FIELDS = ("em", "f1", "acc", "n", "ppl_general", "ppl_wiki", "probe_acc", "weight_l2",
          "seconds")


def _config(data_root):
  c = quickstart.get_config()
  c.data.root = str(data_root)
  c.data.num_distractors = 10
  c.eval.num_questions = 6
  c.eval.num_probe = 16
  c.eval.num_ppl_docs = 2
  c.adapt.max_new_tokens = 12
  c.adapt.batch_size = 8
  return c


def test_evaluate_smollm2_cpkc(shared_data_dir, tmp_path):
  c = _config(shared_data_dir)
  out = evaluate.run(c, tmp_path)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["methods"] == out["methods"]
  assert list(saved["methods"]) == list(c.eval.methods)
  for name, figs in saved["methods"].items():
    assert set(FIELDS) <= set(figs), name
    assert figs["n"] == 6 and 0.0 <= figs["f1"] <= 100.0
    assert 1.0 < figs["ppl_general"] < 1e3 and 1.0 < figs["ppl_wiki"] < 1e3, figs
    assert 0.0 <= figs["probe_acc"] <= 100.0
  m = saved["methods"]
  for name in ("direct", "rag", "regrad", "regrad_icl"):
    assert m[name]["weight_l2"] == 0.0
  for name in ("cpt", "rag_ft", "direct_ft"):  # Fine-tuned: their weights moved.
    assert m[name]["weight_l2"] > 0.0 and math.isfinite(m[name]["ppl_general"]), name
  assert saved["setting"]["num_documents"] == 16
  assert saved["setting"]["meta_state"] == c.meta.init_from  # The released state.
  # Retrieval works on real text: most questions find their own passage.
  rows = [json.loads(l) for l in (tmp_path / "predictions.jsonl").read_text().splitlines()]
  regrad = [r for r in rows if r["method"] == "regrad"]
  found = sum(r["id"] in r["doc_ids"] for r in regrad)  # cpkc: passage id = record id.
  assert found >= 4, regrad
  assert all(r["prediction"].strip() for r in rows if r["method"] == "rag")
  rag_ft = [r for r in rows if r["method"] == "rag_ft"]  # The released adapter, K=1.
  assert len(rag_ft) == 6 and all(len(r["doc_ids"]) == 1 for r in rag_ft)
