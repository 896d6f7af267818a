"""The squad reader, the cpkc + squad mixture and the reference set-up on real data
with the real SmolLM2 tokenizer (no model forward: seconds)."""
import pytest

from configs import smollm2_general
from regrad_jax import data, prompts
from regrad_jax.meta import tasks as tasks_lib
from regrad_jax.model import loaders

pytestmark = pytest.mark.real


def test_squad_mixture_and_reference_tasks_on_real_data(shared_data_dir):
  c = smollm2_general.get_config()
  c.data.root = str(shared_data_dir)
  docs, recs = data.load_split(c, "dev")
  by = {n: [r for r in recs if r.domain == n] for n in ("cpkc", "squad")}
  assert len(by["cpkc"]) == 500 and len(by["squad"]) == 789
  assert len({r.passage_id for r in by["squad"]}) == 147  # One document per paragraph.
  assert len(docs) == 500 + 147
  # Every squad record's first answer is a form its kept passage contains.
  assert sum(r.answers[0] in r.passage for r in by["squad"]) / 789 > 0.99
  c.model.prompt_style = "reference"
  tok = loaders.load_model(c.model)[2]
  tasks = tasks_lib.split_tasks(c, "dev", tok, num=4, k=3, mode="blind",
                                max_context_len=128, selection="reference")
  for t in tasks["squad"]:
    assert tok.decode(t.doc_ids[0]).lstrip().startswith("Passage 0: ")
    assert len(t.doc_ids) == 3 and all(len(d) <= 128 for d in t.doc_ids)
    assert tok.decode(t.qa_ids[t.n_prompt:]) == t.answers[0] + "\n"
    assert "<|start_header_id|>assistant<|end_header_id|>\nAnswer: " in tok.decode(
        t.qa_ids[:t.n_prompt])
  assert prompts.extract_answer(tok, "Denver Broncos\nPassage 1") == "Denver Broncos"
