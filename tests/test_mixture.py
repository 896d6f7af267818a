"""The squad reader, "+"-joined dataset mixtures and per-domain task sampling."""
import json

import numpy as np
import pytest

from configs import common
from regrad_jax import data
from regrad_jax.meta import trainer

RAW = "Oxygen makes up 21% of air, about 40,000 ppm in total."
SPACED = "Oxygen makes up 21 % of air , about 40 , 000 ppm in total ."


def _squad_row(rid, passage, question, answer, raw, source):
  return {"id": rid, "passage": passage, "question": question, "answer": answer,
          "answers": [answer] if answer == raw else [answer, raw], "source": source}


@pytest.fixture
def root(tmp_path):
  rows = {
      "squad/train.jsonl": [
          _squad_row("disflqa-000001", SPACED, "How many ppm?", "40 , 000", "40,000",
                     "disfl_qa"),
          _squad_row("qsel-000002", RAW, "What share of air is oxygen?", "21%", "21%",
                     "question_selection"),
          _squad_row("qsel-000003", "Paris is in France.", "Where is Paris?", "France",
                     "France", "question_selection")],
      "squad/dev.jsonl": [_squad_row("qsel-000004", "Rome is in Italy.", "Where is Rome?",
                                     "Italy", "Italy", "question_selection")],
  }
  for split, ids in (("train", range(3)), ("dev", range(3, 5))):
    rows[f"cpkc/{split}.jsonl"] = [
        {"id": f"cpkc-{i:06d}", "passage": f"Zed{i} wrote book {i}.",
         "question": f"who wrote book {i}?", "answer": f"Zed{i}", "original_answer": None}
        for i in ids]
  for rel, items in rows.items():
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text("".join(json.dumps(r) + "\n" for r in items))
  return tmp_path


def _config(root, name, **fields):
  c = common.base()
  c.data.update(name=name, root=str(root), **fields)
  return c


def test_squad_one_document_per_paragraph(root):
  docs, recs = data.load_split(_config(root, "squad"), "train")
  # The spaced and the raw form of one paragraph are one document (raw text kept).
  assert len(docs) == 2 and docs[0].text == RAW
  assert recs[0].passage_id == recs[1].passage_id == docs[0].id
  # The training target is the form the kept passage contains; both still score.
  assert recs[0].answers == ("40,000", "40 , 000") and recs[0].passage == RAW
  assert {r.domain for r in recs} == {"squad"}
  with pytest.raises(ValueError, match="'squad' has no standard test file"):
    data.load_split(_config(root, "squad"), "test")


def test_mixture_concatenates_and_tags_domains(root):
  config = _config(root, "cpkc+squad")
  docs, recs = data.load_split(config, "train")
  assert [r.domain for r in recs] == ["cpkc"] * 3 + ["squad"] * 3
  assert len(docs) == 3 + 2
  assert data.domain_weights(config) is None
  config.data.weights = (3.0, 1.0)
  assert data.domain_weights(config) == (0.75, 0.25)
  config.data.weights = (1.0,)
  with pytest.raises(ValueError, match="one non-negative weight per dataset"):
    data.domain_weights(config)
  with pytest.raises(ValueError, match="ambiguous for the mixture"):
    data.load_split(_config(root, "cpkc+squad", train="cpkc/train.jsonl"), "train")


def test_mixture_batch_indices():
  sizes, weights = (5, 3), (0.25, 0.75)
  steps = [trainer.batch_indices(0, s, 4, sizes, weights) for s in range(50)]
  idx = np.concatenate(steps)
  # A pure function of the step (resumable), independent of how far the run goes.
  np.testing.assert_array_equal(trainer.batch_indices(0, 7, 4, sizes, weights), steps[7])
  share = np.mean(idx >= 5)
  assert 0.65 < share < 0.85, share  # About weights[1] of the tasks from domain 1.
  # Each domain is covered once per its own epoch: first 3 draws of domain 1 = all of it.
  assert sorted(idx[idx >= 5][:3]) == [5, 6, 7]
  assert sorted(idx[idx < 5][:5]) == [0, 1, 2, 3, 4]
  # One domain: the plain epoch-wise permutation (the single-dataset runs' order).
  one = np.concatenate([trainer.batch_indices(0, s, 4, 8) for s in range(2)])
  assert sorted(one) == list(range(8))


def test_trainer_evaluates_each_domain(root, tmp_path):
  from configs import tiny
  c = tiny.get_config("steps=2")
  c.data.update(name="cpkc+squad", root=str(root), weights=(0.5, 0.5))
  c.meta.update(eval_every=2, num_eval=1, checkpoint_every=2)
  trainer.train(c, tmp_path / "a")
  dev = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")][-1]["dev"]
  assert set(dev["domains"]) == {"cpkc", "squad"}
  assert dev["f1"] == pytest.approx(np.mean([d["f1"] for d in dev["domains"].values()]))
  info = json.loads((tmp_path / "a" / "meta_state" / "info.json").read_text())
  assert info["domains"] == {"cpkc": 3, "squad": 3} and info["k"] == c.meta.k
  # Started from a state, a run logs that state's dev figures as step 0 first.
  c.meta.init_from = str(tmp_path / "a" / "meta_state")
  trainer.train(c, tmp_path / "b", stop_after=0)  # Evaluates, saves, no step.
  first = json.loads(open(tmp_path / "b" / "metrics.jsonl").readline())
  assert first["step"] == 0 and first["dev"]["loss"] == pytest.approx(dev["loss"], rel=1e-5)


def test_fine_tuned_baselines_follow_the_mixture_order(root):
  """rag_ft / direct_ft / icpt see the meta-trainer's tasks on a mixture too:
  records domain after domain, steps drawn with the same sizes and weights."""
  from regrad_jax.baselines import finetuned
  config = _config(root, "cpkc+squad", weights=(3.0, 1.0))
  config.meta.num_train_tasks, config.eval.ft_steps, config.eval.ft_batch_size = 2, 3, 2
  records, sizes = finetuned.training_records(config)
  assert sizes == [2, 2] and [r.domain for r in records] == ["cpkc"] * 2 + ["squad"] * 2
  order = finetuned.task_order(config, sizes)
  np.testing.assert_array_equal(order[2], trainer.batch_indices(config.seed, 2, 2, sizes,
                                                                (0.75, 0.25)))
