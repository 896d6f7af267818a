"""Retrieval: ScaNN vs exact search, persistence, upserts, BM25, the encoder, Retriever."""
import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

from configs import common
from regrad_jax import retrieval
from regrad_jax.retrieval import bm25
from regrad_jax.retrieval import encoder as encoder_lib
from regrad_jax.retrieval import retriever as retriever_lib


def _unit(rng, n, d):
  x = rng.standard_normal((n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _recall(index, oracle, queries, k=10):
  """Recall@k by score (ties make ids ambiguous): hits at or above the exact k-th score."""
  _, got = index.search(queries, k)
  _, exact = oracle.search(queries, k)
  hits = (got >= exact[:, -1:] - 1e-4).sum(axis=1)
  return np.minimum(hits, k).mean() / k


@pytest.fixture(scope="module")
def big():
  rng = np.random.default_rng(0)
  db, queries = _unit(rng, 20_000, 64), _unit(rng, 200, 64)
  ids = [f"doc{i}" for i in range(len(db))]
  scann = retrieval.ScannIndex.from_config(common.base().retrieval.scann).build(ids, None, db)
  return scann, retrieval.BruteForceIndex().build(ids, None, db), queries


def test_scann_default_config_recall(big):
  scann, brute, queries = big
  assert scann.uses_tree  # 20k rows: the k-means tree, not brute force.
  assert 0 < scann.tuned_leaves_to_search <= round(np.sqrt(len(scann)))
  assert _recall(scann, brute, queries) >= 0.95
  # Ids come back as the documents' ids, scores are the true dot products.
  ids, scores = scann.search(queries[:3], 5)
  rows = [[int(d.removeprefix("doc")) for d in row] for row in ids]
  np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries[:3], brute._emb[rows]),
                             atol=1e-5)
  assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_scann_tunes_few_leaves_on_clustered_data():
  # Random vectors (above) need most leaves; clustered ones, like real
  # embeddings, need few. The tuner must find that out on its own.
  rng = np.random.default_rng(4)
  centers = _unit(rng, 40, 32)
  db = centers[rng.integers(0, 40, 6000)] + 0.15 * rng.standard_normal((6000, 32)).astype(np.float32)
  queries = centers[rng.integers(0, 40, 100)] + 0.15 * rng.standard_normal((100, 32)).astype(np.float32)
  ids = [f"d{i}" for i in range(len(db))]
  scann = retrieval.ScannIndex().build(ids, None, db)
  assert scann.tuned_leaves_to_search <= round(np.sqrt(len(db))) // 2
  assert _recall(scann, retrieval.BruteForceIndex().build(ids, None, db), queries) >= 0.95


def test_scann_save_load_identical(big, tmp_path):
  scann, _, queries = big
  scann.save(tmp_path / "a")
  (tmp_path / "a").rename(tmp_path / "b")  # Assets are stored with relative paths.
  loaded = retrieval.load_index(tmp_path / "b")
  assert isinstance(loaded, retrieval.ScannIndex) and loaded.ids == scann.ids
  assert loaded.tuned_leaves_to_search == scann.tuned_leaves_to_search
  ids_a, scores_a = scann.search(queries, 10)
  ids_b, scores_b = loaded.search(queries, 10)
  assert ids_a == ids_b
  np.testing.assert_array_equal(scores_a, scores_b)
  assert not list((tmp_path / "b").rglob("*.pkl"))


@pytest.mark.parametrize("brute_force_below", [10_000, 500])  # ScaNN brute force, then tree.
def test_add_remove_match_brute_force(brute_force_below, tmp_path):
  rng = np.random.default_rng(1)
  db = _unit(rng, 1200, 16)
  ids = [f"d{i}" for i in range(len(db))]
  scann = retrieval.ScannIndex(brute_force_below=brute_force_below).build(ids, None, db)
  brute = retrieval.BruteForceIndex().build(ids, None, db)
  new = _unit(rng, 150, 16)
  upsert_ids = ids[:50] + [f"new{i}" for i in range(100)]  # 50 replaced, 100 appended.
  removed = ids[100:300]
  for index in (scann, brute):
    index.add(upsert_ids, None, new).remove(removed)
  assert scann.ids == brute.ids and len(scann) == 1200 + 100 - 200
  assert scann.ids[:50] == ids[:50]  # Replaced in place, not moved.

  # A replaced or new document is found by its new vector; a removed one never.
  ids_new, _ = scann.search(new, 1)
  assert [row[0] for row in ids_new] == upsert_ids
  found, _ = scann.search(db[100:300], 10)
  assert not set(removed) & {d for row in found for d in row}
  queries = _unit(rng, 100, 16)
  if brute_force_below > len(db):
    ids_a, scores_a = scann.search(queries, 10)
    ids_b, scores_b = brute.search(queries, 10)
    np.testing.assert_allclose(scores_a, scores_b, atol=1e-5)
  else:
    assert scann.uses_tree and _recall(scann, brute, queries) >= 0.95
  scann.save(tmp_path)
  assert retrieval.ScannIndex.load(tmp_path).search(queries, 10)[0] == scann.search(queries, 10)[0]


def test_index_edge_cases(tmp_path):
  rng = np.random.default_rng(2)
  index = retrieval.ScannIndex()
  with pytest.raises(ValueError, match="empty"):
    index.search(_unit(rng, 1, 8), 3)
  index.build(["a", "b", "c"], None, _unit(rng, 3, 8))
  ids, scores = index.search(_unit(rng, 2, 8), 10)  # k > len: all 3.
  assert [sorted(r) for r in ids] == [["a", "b", "c"]] * 2 and scores.shape == (2, 3)
  with pytest.raises(ValueError, match="Duplicate"):
    retrieval.BruteForceIndex().build(["a", "a"], None, _unit(rng, 2, 8))
  with pytest.raises(KeyError, match="zzz"):
    index.remove(["zzz"])
  with pytest.raises(ValueError, match="dim"):
    index.add(["d"], None, _unit(rng, 1, 4))
  with pytest.raises(TypeError, match="embed the texts"):
    index.search(["a question"], 1)
  with pytest.raises(ValueError, match="k must be"):
    index.search(_unit(rng, 1, 8), 0)
  index.remove(["a", "b", "c"])
  with pytest.raises(ValueError, match="empty"):
    index.search(_unit(rng, 1, 8), 1)
  index.save(tmp_path)
  assert len(retrieval.load_index(tmp_path)) == 0
  with pytest.raises(ValueError, match="not 'brute'"):
    retrieval.BruteForceIndex.load(tmp_path)
  fresh = retrieval.BruteForceIndex().add(["e"], None, _unit(rng, 1, 4))  # add() without build().
  assert fresh.search(_unit(rng, 1, 4), 5)[0] == [["e"]]


_DOCS = {
    "paris": "Paris is the capital and largest city of France, on the river Seine.",
    "nile": "The Nile is a major north-flowing river in northeastern Africa.",
    "python": "Python is a high-level programming language created by Guido van Rossum.",
    "everest": "Mount Everest is Earth's highest mountain above sea level, in the Himalayas.",
    "jupiter": "Jupiter is the fifth planet from the Sun and the largest in the Solar System.",
    "violin": "The violin is a wooden string instrument played with a bow.",
}
_QUESTIONS = {
    "what is the capital of france?": "paris",
    "which river flows north through africa": "nile",
    "who created the python programming language?": "python",
    "what is the highest mountain on earth?": "everest",
    "which planet is the largest in the solar system?": "jupiter",
    "what instrument is played with a bow?": "violin",
}


def test_bm25_finds_the_right_document(tmp_path):
  index = retrieval.BM25Index().build(list(_DOCS), list(_DOCS.values()))
  ids, scores = index.search(list(_QUESTIONS), 2)
  assert [row[0] for row in ids] == list(_QUESTIONS.values())
  assert (scores[:, 0] > scores[:, 1]).all()
  index.save(tmp_path)
  loaded = retrieval.load_index(tmp_path)
  assert loaded.search(list(_QUESTIONS), 2)[0] == ids
  # Upsert + remove rebuild from the stored texts.
  loaded.add(["paris", "rome"], ["Lyon is a city in France.", "Rome is the capital of Italy."])
  loaded.remove(["nile"])
  ids, _ = loaded.search(["capital of italy", "city in france", "river africa"], 1)
  assert ids[0] == ["rome"] and ids[1] == ["paris"] and ids[2] != ["nile"]
  assert len(loaded) == 6


def test_bm25_neighbours_gold_first_or_top_k():
  questions, ids, texts = list(_QUESTIONS), list(_DOCS), list(_DOCS.values())
  top = retrieval.BM25Index().build(ids, texts).search(questions, 3)[0]
  assert bm25.neighbours(ids, texts, questions, 3) == top  # Rank order.
  gold = ids[:len(questions)]  # Mostly not the question's best hit.
  got = bm25.neighbours(ids, texts, questions, 3, gold)
  assert got == [[g] + [h for h in row if h != g][:2] for g, row in zip(gold, top)]
  assert all(len(row) == len(set(row)) == 3 for row in got)
  assert bm25.neighbours(ids, texts, questions, 1, gold) == [[g] for g in gold]


# --- Encoder -----------------------------------------------------------------------


def _write_tiny_bert(path: pathlib.Path):
  """A random BertModel + a WordPiece tokenizer.json, as a Hugging Face folder."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
  words = ("the a of is in on who what which capital france paris city river made video "
           "song band planet largest sun run ##s ##ing ##ed").split()
  vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
  tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  tok.save(str(path / "tokenizer.json"))
  config = transformers.BertConfig(
      vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=48, max_position_embeddings=64, attn_implementation="eager")
  torch.manual_seed(0)
  model = transformers.BertModel(config).eval()
  with torch.no_grad():  # Large, non-trivial weights (LayerNorm too) so errors show.
    for p in model.parameters():
      p.add_(0.3 * torch.randn_like(p))
  model.save_pretrained(path)
  return model, tok


def test_encoder_matches_torch_bert(tmp_path):
  import torch
  model, tok = _write_tiny_bert(tmp_path)
  texts = ["The capital of France is Paris.", "who made the video", "a",
           "the river runs in the city " * 6, "unknown words only: zebra yak", "Planets!"]
  got = retrieval.Encoder.load(tmp_path).embed(texts, batch_size=4)
  enc = tok.encode_batch(texts)
  width = max(len(e.ids) for e in enc)
  ids = torch.tensor([e.ids + [0] * (width - len(e.ids)) for e in enc])
  mask = torch.tensor([[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in enc])
  with torch.no_grad():
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
  pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
  want = torch.nn.functional.normalize(pooled, dim=-1).numpy()
  assert got.shape == (len(texts), 32) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_encoder_param_tree_is_the_flax_modules_tree():
  enc = retrieval.Encoder.tiny(dim=32)
  shapes = encoder_lib.param_shapes(enc.config)  # BertEncoder.init, via eval_shape.
  assert jax.tree.structure(shapes) == jax.tree.structure(enc.params)
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, enc.params)
  # A checkpoint whose tensor disagrees with config.json is refused by name.
  tensors = {f"embeddings.{n}.weight": np.zeros(shape, np.float32) for n, shape in (
      ("word_embeddings", (4096, 32)), ("position_embeddings", (128, 32)),
      ("token_type_embeddings", (2, 32)), ("LayerNorm", (32,)))}
  tensors["embeddings.LayerNorm.bias"] = np.zeros((31,), np.float32)
  for i in range(enc.config.num_layers):
    for ours, theirs in encoder_lib._HF_LAYER.items():
      d_in, d_out = (64, 32) if ours == "ffn_out" else (32, 64) if ours == "ffn_in" else (32, 32)
      tensors[f"encoder.layer.{i}.{theirs}.weight"] = np.zeros((d_out, d_in), np.float32)
      tensors[f"encoder.layer.{i}.{theirs}.bias"] = np.zeros((d_out,), np.float32)
    for theirs in encoder_lib._HF_LAYER_LN.values():
      for leaf in ("weight", "bias"):
        tensors[f"encoder.layer.{i}.{theirs}.{leaf}"] = np.ones((32,), np.float32)
  with pytest.raises(ValueError, match=r"\['embed'\]\['ln_bias'\] has shape \(31,\)"):
    encoder_lib.params_from_hf(tensors, enc.config)


def test_encoder_buckets_and_order():
  enc = retrieval.Encoder.tiny(dim=32)
  rng = np.random.default_rng(3)
  words = ["alpha", "beta", "gamma", "delta", "eps"]
  texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 60, size=40)]
  before = encoder_lib.encode._cache_size()
  batched = enc.embed(texts, batch_size=16)
  # 40 texts of 3-62 tokens in batches of 16: lengths from {16, 32, 64}, rows from {8, 16}.
  assert encoder_lib.encode._cache_size() - before <= 4
  single = np.concatenate([enc.embed([t], batch_size=16) for t in texts[:5]])
  np.testing.assert_allclose(batched[:5], single, atol=1e-5)  # Input order kept.
  np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
  assert enc.embed([]).shape == (0, 32)
  with pytest.raises(TypeError):
    enc.embed("one string")


# --- Retriever ---------------------------------------------------------------------


@dataclasses.dataclass
class _Doc:
  id: str
  text: str


def _config(backend):
  c = common.base()
  c.retrieval.backend, c.retrieval.encoder, c.retrieval.batch_size = backend, "tiny", 8
  return c


@pytest.mark.parametrize("backend", ["scann", "brute", "bm25"])
def test_retriever_roundtrip(backend, tmp_path):
  docs = [_Doc(k, v) for k, v in _DOCS.items()]
  retriever = retrieval.Retriever.build(_config(backend), docs)
  # A document's own text finds it (the tiny encoder is a bag of hashed words).
  ids, scores = retriever.search([d.text for d in docs], 2)
  assert [row[0] for row in ids] == list(_DOCS) and scores.shape == (6, 2)
  ids, _ = retriever.search(["capital of france"], 100)
  assert len(ids[0]) == 6  # k > len: everything.
  retriever.save(tmp_path)
  loaded = retrieval.Retriever.load(tmp_path)
  assert loaded.search(list(_QUESTIONS), 3)[0] == retriever.search(list(_QUESTIONS), 3)[0]
  loaded.add([_Doc("rome", "Rome is the capital of Italy.")])
  loaded.remove(["violin"])
  assert loaded.search(["Rome is the capital of Italy."], 1)[0] == [["rome"]]
  assert "violin" not in loaded.ids and len(loaded) == 6
  for bad in ([], [""], ["ok", "  "]):
    with pytest.raises(ValueError):
      loaded.search(bad, 1)
  loaded.remove(loaded.ids)
  with pytest.raises(ValueError, match="empty"):
    loaded.search(["anything"], 1)


def test_saved_retriever_is_verified(tmp_path):
  """Saves commit through current.json; any changed file or id is refused, naming
  it; a folder in the layout before current.json still loads (unverified)."""
  docs = [_Doc(k, v) for k, v in _DOCS.items()]
  retriever = retrieval.Retriever.build(_config("brute"), docs)
  retriever.save(tmp_path / "i", stamp={"generation": 3})
  retriever.save(tmp_path / "i", stamp={"generation": 4})  # Replaces the first save.
  assert len(list((tmp_path / "i").glob("v-*"))) == 1
  loaded = retrieval.Retriever.load(tmp_path / "i")
  assert loaded.stamp == {"generation": 4} and loaded.ids == retriever.ids
  folder = next((tmp_path / "i").glob("v-*"))
  meta = json.loads((folder / "index.json").read_text())
  meta["ids"][:2] = meta["ids"][1::-1]  # Valid JSON, two ids swapped.
  (folder / "index.json").write_text(json.dumps(meta))
  with pytest.raises(retriever_lib.IndexDamagedError, match="index.json was altered"):
    retrieval.Retriever.load(tmp_path / "i")
  retriever.save(tmp_path / "i", stamp={"generation": 5})
  pointer = json.loads((tmp_path / "i" / "current.json").read_text())
  pointer["stamp"]["generation"] = 6
  (tmp_path / "i" / "current.json").write_text(json.dumps(pointer))
  with pytest.raises(retriever_lib.IndexDamagedError, match="current.json was altered"):
    retrieval.Retriever.load(tmp_path / "i")
  retriever.save(tmp_path / "i")
  next((tmp_path / "i").glob("v-*/embeddings.npy")).unlink()
  with pytest.raises(retriever_lib.IndexDamagedError, match="embeddings.npy is missing"):
    retrieval.Retriever.load(tmp_path / "i")
  legacy = tmp_path / "legacy"  # What save wrote before: files directly in the folder.
  retriever.index.save(legacy)
  (legacy / "retriever.json").write_text(json.dumps(
      {"encoder": retriever.encoder.spec, "batch_size": 8}))
  old = retrieval.Retriever.load(legacy)
  assert old.ids == retriever.ids and old.stamp is None
