"""The reference set-up as options: prompt style, task selection, raw-text banking."""
import pytest

from configs import common
from configs import tiny
from regrad_jax import prompts
from regrad_jax.bank import compute
from regrad_jax.data.records import Document, QARecord
from regrad_jax.meta import tasks as tasks_lib
from regrad_jax.model import loaders
from regrad_jax.model.tokenizer import ByteTokenizer


def _tok(style):
  tok = ByteTokenizer()
  tok.prompt_style = style
  return tok


def _family(n=6):
  docs = [Document(f"d{i}", f"The capital of Land{i} is City{i}.") for i in range(n)]
  recs = [QARecord(f"q{i}", f"What is the capital of Land{i}?", (f"City{i}",), f"d{i}")
          for i in range(n)]
  return docs, recs


def test_reference_prompt_strings():
  tok = _tok("reference")
  blind = prompts.qa_prompt("Who?", tok)
  assert blind.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n"
                          "You are a helpful AI assistant who is ready to answer user's "
                          "question. \nYour answer should be concise")
  assert blind.endswith("<|start_header_id|>user<|end_header_id|>\nWho?<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\nAnswer: ")
  icl = prompts.qa_prompt("Who?", tok, ["a b", "c d"])
  assert ("####CONTEXT begin####\nPassage 0: a b\nPassage 1: c d\n####CONTEXT end####\n"
          "You are a helpful AI assistant who is ready to answer user's question "
          "according to the CONTEXT. \n") in icl
  # "\n"-terminated target, no EOS; the answer is the first line of the output.
  ids, n_prompt = prompts.encode_qa(tok, "Who?", "Ann")
  assert tok.decode(ids[n_prompt:]) == "Ann\n" and tok.eos_id not in ids
  assert prompts.extract_answer(tok, " Ann Lee\nPassage 2: more") == "Ann Lee"
  # The default style is unchanged: EOS after the answer, numbering from 1.
  auto = ByteTokenizer()
  ids, n_prompt = prompts.encode_qa(auto, "Who?", "Ann")
  assert ids[-1] == auto.eos_id and "Passage 1: a b" in prompts.qa_prompt("Who?", auto, ["a b"])
  assert prompts.extract_answer(auto, " Ann\nB ") == "Ann\nB"


def test_reference_tasks_are_bm25_top_k_in_rank_order():
  docs, recs = _family()
  tok = _tok("reference")
  got = tasks_lib.build_tasks(recs, docs, tok, k=3, mode="blind", max_context_len=64,
                              selection="reference")
  from regrad_jax.retrieval import bm25
  index = bm25.BM25Index()
  index.build([d.id for d in docs], [d.text for d in docs])
  hits, _ = index.search([r.question for r in recs], 3)
  text = {d.id: d.text for d in docs}
  for task, row in zip(got, hits):
    assert task.passages == tuple(text[h] for h in row)
    assert tok.decode(task.doc_ids[0]).startswith("Passage 0: ")
  gold = tasks_lib.build_tasks(recs, docs, ByteTokenizer(), k=3, mode="blind",
                               max_context_len=64)
  assert all(text[r.passage_id] in t.passages for r, t in zip(recs, gold))
  with pytest.raises(ValueError, match="meta.tasks must be one of"):
    tasks_lib.build_tasks(recs, docs, tok, k=3, mode="blind", max_context_len=64,
                          selection="top")


def test_raw_text_banking_and_style_from_config():
  tok = ByteTokenizer()
  raw = compute.tokenize_documents(tok, ["abc"], 16, (16,), index=None)[0]
  framed = compute.tokenize_documents(tok, ["abc"], 16, (16,))[0]
  assert tok.decode(raw[0][raw[1]]) == "abc"
  assert tok.decode(framed[0][framed[1]]) == "Passage 1: abc"
  c = tiny.get_config()
  c.model.prompt_style = "reference"
  assert loaders.load_model(c.model)[2].prompt_style == "reference"
  c.model.prompt_style = "llama"
  with pytest.raises(ValueError, match="prompt style 'llama'"):
    loaders.load_model(c.model)
  assert common.base().bank.raw_text is False
