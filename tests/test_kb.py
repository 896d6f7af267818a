"""The knowledge base under faults: kills during every write, damaged and tampered
files, bad input, long documents. Tiny config; one built workdir copied per test."""
import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from regrad_jax import kb as kb_lib
from regrad_jax import retrieval
from regrad_jax.adapt import ReGrad
from regrad_jax.bank import bank as bank_lib
from regrad_jax.bank import catalog as catalog_lib
from regrad_jax.bank import pipeline
from regrad_jax.bank import store
from regrad_jax.retrieval import retriever as retriever_lib
from tests import _kb_worker as worker
from tests.conftest import REPO

CONFIG = worker.config()
QUESTION = "Where does the river Oxlen flow?"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A workdir with meta_state, the tiny corpus committed, and its index."""
  w = tmp_path_factory.mktemp("kb") / "w"
  w.mkdir()
  worker.make_state(CONFIG, w)
  pipeline.build_from_config(CONFIG, w, progress=False)
  retrieval.build_and_save(CONFIG, w)
  return w


@pytest.fixture
def wd(built, tmp_path):
  """A private copy of the built workdir."""
  return pathlib_copy(built, tmp_path / "w")


def pathlib_copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def files(w) -> dict:
  """{relative path: (size, mtime_ns)} of everything under w."""
  out = {}
  for root, dirs, names in os.walk(w):
    for n in names + dirs:
      st = os.stat(os.path.join(root, n))
      out[os.path.relpath(os.path.join(root, n), w)] = (st.st_size, st.st_mtime_ns)
  return out


def state(w) -> dict:
  """What is committed: {doc id: text}, {passage id: (row, checksum)}, generation."""
  cat = catalog_lib.Catalog(w / catalog_lib.FILE)
  return {"docs": cat.documents, "rows": {p.id: (p.row, p.checksum) for p in cat.passages},
          "generation": cat.generation}


def committed_rows(w) -> dict:
  """{passage id: {leaf: row}} read (and verified) through the knowledge base."""
  kb = kb_lib.KnowledgeBase.open(w)
  ids = kb.bank.ids
  flat = kb.bank.read_rows(kb.bank.rows_of(ids))
  return {i: {leaf: x[k] for leaf, x in flat.items()} for k, i in enumerate(ids)}


def chunk_files(w) -> list:
  return sorted(p for p in (w / "bank" / "arrays").rglob("c.*") if p.is_file())


def row_chunks(w, row: int) -> list:
  return [p for p in chunk_files(w) if p.name.split(".")[1] == str(row)]


# --- Kill during every write ---------------------------------------------------------


def run_killed(w, op: str, kill_at: str):
  proc = subprocess.run(
      [sys.executable, str(REPO / "tests" / "_kb_worker.py"), "--workdir", str(w),
       "--op", op, "--kill_at", kill_at], capture_output=True, cwd=REPO, timeout=500)
  assert proc.returncode == -signal.SIGKILL, (proc.stdout + proc.stderr).decode()[-3000:]


# (op, kill point, whether the change was committed when the process died)
KILLS = [("inject", "bank", False), ("inject", "catalog", False),
         ("inject", "index", True), ("remove", "tombstone", True),
         ("remove", "index", True), ("replace", "bank", False),
         ("replace", "catalog", False)]


@pytest.mark.parametrize("op,kill_at,committed", KILLS)
def test_sigkill_during_a_write_reloads_the_last_committed_state(wd, op, kill_at, committed):
  before, rows_before = state(wd), committed_rows(wd)
  run_killed(wd, op, kill_at)
  after = state(wd)
  engine = ReGrad.load(wd, CONFIG)
  if not committed:  # Exactly the old state, every row intact.
    assert after == before
    got = committed_rows(wd)
    assert set(got) == set(rows_before)
    for i in got:
      for leaf in got[i]:
        np.testing.assert_array_equal(got[i][leaf], rows_before[i][leaf])
  elif op == "inject":
    assert after["docs"] == {**before["docs"], worker.NEW_DOC[0]: worker.NEW_DOC[1]}
    assert after["generation"] == before["generation"] + 1
  else:
    assert worker.REMOVE_ID not in after["docs"] and len(after["docs"]) == len(before["docs"]) - 1
  # Bank, index and texts agree with the catalog after the reload ...
  assert sorted(engine.retriever.ids) == sorted(after["rows"]) == sorted(engine.bank.ids)
  assert set(engine.texts) >= set(after["docs"])
  # ... and every answer comes from committed documents only.
  results = engine.answer([QUESTION, "What language do people speak?"], k=100)
  assert all(set(r.doc_ids) == set(after["docs"]) for r in results)
  # Trying again (or another write) works: nothing is left half-done.
  if op == "inject":
    if committed:
      with pytest.raises(ValueError, match="already in the knowledge base"):
        engine.inject([worker.NEW_DOC])
    else:
      assert engine.inject([worker.NEW_DOC]).computed == 0  # The killed run's rows reused.
      assert engine.answer([QUESTION], k=1)[0].doc_ids == (worker.NEW_DOC[0],)
  elif op == "remove":
    with pytest.raises(KeyError, match=worker.REMOVE_ID):
      engine.remove([worker.REMOVE_ID])
  check = kb_lib.check(wd)
  if committed:  # The index was not saved: loads are right meanwhile (in memory),
    # and check_kb says what to run.
    assert not check.ok and "build_index" in check.problems[0]
    retrieval.build_and_save(CONFIG, wd)
    check = kb_lib.check(wd)
  assert check.ok, check.problems


def test_sigkill_during_the_first_build_resumes_without_recomputing(tmp_path):
  w = tmp_path / "w"
  w.mkdir()
  worker.make_state(CONFIG, w)
  run_killed(w, "build", "bank")
  kb = kb_lib.KnowledgeBase.open(w)
  assert kb.documents == {} and kb.bank.num_rows == 8  # Rows computed, none committed.
  _, report = pipeline.build_from_config(CONFIG, w, progress=False)
  assert report.computed == 0 and report.kb.added == 8
  assert len(kb_lib.KnowledgeBase.open(w).documents) == 8


# --- Read paths never write ------------------------------------------------------------


def test_missing_manifest_is_refused_and_nothing_is_deleted(wd):
  (wd / "bank" / "manifest.json").unlink()
  before = files(wd)
  for load in (lambda: ReGrad.load(wd, CONFIG), lambda: kb_lib.KnowledgeBase.open(wd)):
    with pytest.raises(bank_lib.BankDamagedError, match="manifest.json.*missing"):
      load()
  proc = subprocess.run([sys.executable, "-m", "launch.answer", "--config=configs/tiny.py",
                         f"--workdir={wd}", "--question=hi"], capture_output=True, cwd=REPO,
                        timeout=300)
  assert proc.returncode != 0 and b"manifest.json" in proc.stderr
  assert files(wd) == before  # No chunk deleted, nothing created.
  # A writer refuses too, rather than overwrite the arrays with an empty bank.
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    bank_lib.Bank.create(wd / "bank", identity=None, codec=None, lora_config=None,
                         leaf_shapes={})


def test_no_knowledge_base_is_refused_and_nothing_is_created(tmp_path, built):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="launch.build_bank"):
    ReGrad.load(empty, CONFIG)
  assert not list(empty.iterdir())  # No empty bank/ left behind.
  legacy = tmp_path / "legacy"  # A bank built before the catalog existed.
  shutil.copytree(built / "bank", legacy / "bank")
  with pytest.raises(FileNotFoundError, match="no knowledge-base catalog.*build_bank"):
    kb_lib.KnowledgeBase.open(legacy)


def test_loading_and_answering_write_nothing(wd):
  before = files(wd)
  engine = ReGrad.load(wd, CONFIG)
  engine.answer(["What language do people speak?"])
  kb_lib.check(wd)
  assert files(wd) == before


# --- Damage detected -------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_damaged_chunk_is_an_error_and_check_kb_repairs_it(wd, damage):
  kb = kb_lib.KnowledgeBase.open(wd)
  victim = kb.catalog.passages[3]
  want = committed_rows(wd)[victim.id]
  path = row_chunks(wd, victim.row)[0]
  data = path.read_bytes()
  if damage == "delete":
    path.unlink()
  elif damage == "truncate":
    path.write_bytes(data[:len(data) // 2])
  else:
    path.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
  engine = ReGrad.load(wd, CONFIG)  # Opening reads no rows ...
  with pytest.raises(bank_lib.BankDamagedError, match=f"rows \\[{victim.row}\\]"):
    engine.bank.gather_sum([[victim.id]])  # ... reading the damaged one fails.
  report = kb_lib.check(wd)
  assert report.damaged == [victim.id] and "--repair" in report.problems[0]
  proc = subprocess.run([sys.executable, "-m", "launch.check_kb", f"--workdir={wd}"],
                        capture_output=True, cwd=REPO, timeout=300)
  assert proc.returncode == 1 and victim.id.encode() in proc.stdout
  fixed = pipeline.check_and_repair(wd, CONFIG)
  assert fixed.ok, fixed.problems
  got = committed_rows(wd)[victim.id]
  for leaf in want:  # Recomputed from the stored text at the recorded theta*.
    np.testing.assert_allclose(got[leaf], want[leaf], rtol=1e-5, atol=1e-7)


def test_flipped_zstd_chunk_fails_its_checksum(tmp_path):
  from tests import _bank_worker as bw
  setup = bw.fixture(num_docs=2)
  computer = bw.make_computer(setup, codec="qzstd")
  b = bank_lib.Bank.open_for(tmp_path / "b", computer)
  b.build(setup[-1], computer)
  spec = json.loads(next((tmp_path / "b" / "arrays").rglob("q/zarr.json")).read_text())
  assert {"name": "zstd", "configuration": {"level": 3, "checksum": True}} in spec["codecs"]
  path = next((tmp_path / "b" / "arrays").rglob("q/c.*"))
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))
  with pytest.raises(bank_lib.BankDamagedError, match="cannot be read|checksum"):
    bank_lib.Bank.open(tmp_path / "b").read_rows([0, 1])


def _edit_manifest(w, change):
  path = w / "bank" / "manifest.json"
  m = json.loads(path.read_text())
  change(m)
  path.write_text(json.dumps(m))


def test_valid_json_edits_of_the_manifest_are_refused(wd):
  _edit_manifest(wd, lambda m: m["ids"].__setitem__(slice(0, 2), m["ids"][1::-1]))
  with pytest.raises(bank_lib.BankDamagedError, match="manifest.json was altered"):
    ReGrad.load(wd, CONFIG)
  _edit_manifest(wd, lambda m: m["ids"].__setitem__(slice(0, 2), m["ids"][1::-1]))
  ReGrad.load(wd, CONFIG)  # Restored: fine again.
  _edit_manifest(wd, lambda m: m["lora_config"].__setitem__("rank", 8))
  with pytest.raises(bank_lib.BankDamagedError, match="altered"):
    kb_lib.KnowledgeBase.open(wd)
  (wd / "bank" / "manifest.json").write_text("{not json")
  with pytest.raises(ValueError, match="manifest.json is damaged"):
    kb_lib.KnowledgeBase.open(wd)


def _sql(w, statement):
  con = sqlite3.connect(w / catalog_lib.FILE)
  con.execute(statement)
  con.commit()
  con.close()


def test_tampered_catalog_is_refused(wd):
  rows = state(wd)["rows"]
  a, b = sorted(rows)[:2]
  _sql(wd, f"UPDATE passages SET row = CASE id WHEN '{a}' THEN {rows[b][0]} "
           f"ELSE {rows[a][0]} END WHERE id IN ('{a}', '{b}')")
  with pytest.raises(catalog_lib.CatalogDamagedError, match=f"{a}.*do not match"):
    ReGrad.load(wd, CONFIG)


def test_consistently_rehashed_catalog_swap_is_still_caught(wd):
  """Rows swapped with every record and catalog_sha recomputed: the bank's rows
  carry their ids, so the swap still fails."""
  cat = catalog_lib.Catalog(wd / catalog_lib.FILE)
  p, q = cat.passages[:2]
  os.unlink(wd / catalog_lib.FILE)
  fresh = catalog_lib.Catalog.create(wd / catalog_lib.FILE,
                                     bank_fingerprint=cat.bank_fingerprint,
                                     settings=cat.settings)
  swap = {p.id: q, q.id: p}

  def swapped(x):
    other = swap.get(x.id, x)
    return dataclasses.replace(x, row=other.row, checksum=other.checksum)
  fresh.commit([(d, t, [swapped(x) for x in cat.passages_of([d])])
                for d, t in cat.documents.items()])
  with pytest.raises(catalog_lib.CatalogDamagedError, match="disagree on the rows"):
    kb_lib.KnowledgeBase.open(wd)


def test_tampered_index_is_refused(wd):
  folder = next((wd / "index").glob("v-*"))
  meta = json.loads((folder / "index.json").read_text())
  meta["ids"][:2] = meta["ids"][1::-1]
  (folder / "index.json").write_text(json.dumps(meta))
  with pytest.raises(retriever_lib.IndexDamagedError, match="index.json was altered"):
    ReGrad.load(wd, CONFIG)
  report = kb_lib.check(wd)
  assert "index.json was altered" in report.problems[0] and "build_index" in report.problems[0]


# --- Validation before any write ---------------------------------------------------------


def test_bad_inputs_are_refused_before_any_write(wd):
  engine = ReGrad.load(wd, CONFIG)
  before = files(wd)
  with pytest.raises(ValueError, match="'bad-doc'.*not valid Unicode"):
    engine.inject([("ok", "fine text"), ("bad-doc", "a lone \ud800 surrogate")])
  with pytest.raises(ValueError, match="empty documents.*'e'"):
    engine.inject([("e", " \n")])
  with pytest.raises(ValueError, match="duplicate document ids"):
    engine.inject([("a", "one"), ("a", "two")])
  with pytest.raises(TypeError, match="'n'.*str"):
    engine.inject([("n", 3)])
  with pytest.raises(TypeError, match="document 0"):
    engine.inject([42])
  with pytest.raises(ValueError, match="already in the knowledge base.*tiny-032"):
    engine.inject([("tiny-032", "something else")])
  with pytest.raises(KeyError, match="never-seen"):
    engine.remove(["tiny-032", "never-seen"])
  with pytest.raises(TypeError):
    engine.remove("tiny-032")
  assert files(wd) == before
  assert "tiny-032" in engine.bank and "tiny-032" in engine.retriever.ids


def test_config_contradicting_the_state_is_an_error(wd):
  cfg = worker.config()
  cfg.lora.rank = 8
  with pytest.raises(ValueError, match="rank=8 \\(state: 4\\)"):
    ReGrad.load(wd, cfg)
  with pytest.raises(ValueError, match="rank=8"):
    pipeline.build_from_config(cfg, wd, progress=False)


def test_writer_lock_fails_fast_or_waits(wd):
  engine = ReGrad.load(wd, CONFIG)
  with store.writer_lock(wd, name=kb_lib.LOCK):
    with pytest.raises(RuntimeError, match="being written by another process"):
      engine.remove(["tiny-032"])
  assert "tiny-032" in engine.kb.documents
  held = threading.Event()

  def hold():
    with store.writer_lock(wd, name=kb_lib.LOCK):
      held.set()
      time.sleep(0.5)
  t = threading.Thread(target=hold)
  t.start()
  held.wait()
  engine.kb.lock_timeout = 30.0
  engine.remove(["tiny-032"])  # Waits for the other writer, then commits.
  t.join()
  assert "tiny-032" not in kb_lib.KnowledgeBase.open(wd).documents


# --- The index follows the knowledge base ------------------------------------------------


def test_reload_answers_from_exactly_the_committed_documents(wd):
  engine = ReGrad.load(wd, CONFIG)
  engine.inject([worker.NEW_DOC])
  engine.remove(["tiny-032"])
  committed = set(kb_lib.KnowledgeBase.open(wd).documents)
  assert worker.NEW_DOC[0] in committed and "tiny-032" not in committed
  for reloaded in (ReGrad.load(wd, CONFIG), None):
    if reloaded is None:  # build_index indexes the knowledge base, not the config corpus.
      retrieval.build_and_save(CONFIG, wd)
      reloaded = ReGrad.load(wd, CONFIG)
    assert set(reloaded.retriever.ids) == committed == set(reloaded.bank.ids)
    r = reloaded.answer([QUESTION], k=100)[0]
    assert set(r.doc_ids) == committed
    assert reloaded.answer([QUESTION], k=1)[0].doc_ids == (worker.NEW_DOC[0],)
  assert kb_lib.check(wd).ok


# --- Long documents ----------------------------------------------------------------------


LONG = ("Velmora is a harbor city of blue stone. " * 3 + "Its castle has seven owls. "
        "The north gate faces the maple engine works. The violet river runs quiet there. "
        "At the far end the Oxlen lighthouse keeper is named Brannoch Tull.")


def test_long_documents_are_chunked_banked_and_mapped_back(wd):
  engine = ReGrad.load(wd, CONFIG)
  tok, chunking = engine.model.tokenizer, engine.chunking
  assert chunking.mode == "chunk"
  parts = kb_lib.split_document(tok, "long", LONG, chunking)
  assert len(parts) >= 3 and [p for p, _ in parts] == [f"long#{i}" for i in range(len(parts))]
  for (_, a), (_, b) in zip(parts, parts[1:]):  # Each fits; neighbours overlap.
    assert not kb_lib.prompts.encode_document(tok, a, chunking.max_len)[1]
    assert a.split()[-1] in b.split()[:chunking.overlap]
  words = LONG.split()
  assert [w for _, t in parts for w in t.split()][-3:] == words[-3:]  # Nothing lost.
  assert set(words) == {w for _, t in parts for w in t.split()}
  engine.inject([("long", LONG)])
  r = engine.answer(["Who is the Oxlen lighthouse keeper?"], k=2)[0]
  assert r.doc_ids[0] == "long" and "lighthouse" in dict(parts)[r.passage_ids[0]]
  assert engine.texts["long"] == LONG and engine.texts[parts[-1][0]] == parts[-1][1]
  reloaded = ReGrad.load(wd, CONFIG)
  assert {p for p, _ in parts} <= set(reloaded.retriever.ids)
  reloaded.remove(["long"])  # All its passages go.
  assert not {p for p, _ in parts} & set(ReGrad.load(wd, CONFIG).retriever.ids)
  truncate = kb_lib.Chunking("truncate", chunking.max_len, chunking.overlap)
  assert kb_lib.split_document(tok, "long", LONG, truncate) == [("long", LONG)]
  with pytest.raises(ValueError, match="would belong to two documents"):
    engine.inject([("x", LONG), ("x#0", "clash")])


def test_bank_built_before_the_catalog_is_adopted_without_recomputing(wd):
  """A format-1 bank (no row checksums, no manifest hash, no kb.sqlite): refused by
  readers with what to run; build_bank then commits it, reusing every row."""
  rows_before = committed_rows(wd)

  def legacy(m):
    m["format_version"] = 1
    for key in ("checksums", "sha256"):
      m.pop(key)
  _edit_manifest(wd, legacy)
  (wd / catalog_lib.FILE).unlink()
  shutil.rmtree(wd / "index")
  with pytest.raises(FileNotFoundError, match="no knowledge-base catalog.*launch.build_bank"):
    ReGrad.load(wd, CONFIG)
  _, report = pipeline.build_from_config(CONFIG, wd, progress=False)
  assert report.computed == 0 and report.kb.added == 8
  got = committed_rows(wd)
  for i in rows_before:
    for leaf in got[i]:
      np.testing.assert_array_equal(got[i][leaf], rows_before[i][leaf])
  victim = kb_lib.KnowledgeBase.open(wd).catalog.passages[0]  # Now checked on read.
  path = row_chunks(wd, victim.row)[0]
  data = path.read_bytes()
  path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
  assert kb_lib.check(wd).damaged == [victim.id]


def test_two_writers_lose_no_commit(wd):
  """B was loaded before A's commit; its commit keeps A's, and B's index follows."""
  a, b = ReGrad.load(wd, CONFIG), ReGrad.load(wd, CONFIG)
  a.inject([worker.NEW_DOC])
  b.inject([("other", "The lake Parmit is cold and deep in winter.")])
  with pytest.raises(ValueError, match="already in the knowledge base"):
    b.inject([worker.NEW_DOC])  # B sees A's document under the lock.
  b.remove(["tiny-032"])
  with pytest.raises(KeyError, match="tiny-032"):
    a.remove(["tiny-032"])
  docs = kb_lib.KnowledgeBase.open(wd).documents
  assert {worker.NEW_DOC[0], "other"} <= set(docs) and "tiny-032" not in docs
  assert sorted(b.retriever.ids) == sorted(docs)
  assert kb_lib.check(wd).ok
