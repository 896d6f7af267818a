"""Gradient Bank: gradients, codecs, storage round trips, lifecycle, bad input, resume."""
import functools
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from regrad_jax import bank
from regrad_jax.bank import codecs
from regrad_jax.bank import compute
from regrad_jax.model import losses
from regrad_jax.model.tokenizer import ByteTokenizer
from tests import _bank_worker as worker
from tests.conftest import REPO


@pytest.fixture(scope="module")
def setup():
  return worker.fixture()


@pytest.fixture(scope="module")
def computer4(setup):
  """4 fake CPU devices on the data axis, 2 documents per device."""
  return worker.make_computer(setup, devices=jax.devices()[:4])


@pytest.fixture(scope="module")
def computer1(setup):
  """1 device, 2 documents per step: the same per-device program as computer4."""
  return worker.make_computer(setup, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def built(tmp_path_factory, setup, computer4):
  b = bank.Bank.open_for(tmp_path_factory.mktemp("bank") / "fp32", computer4)
  report = b.build(setup[-1], computer4)
  return b, report


def rows_by_id(b, ids) -> dict:
  """{id: {leaf: row}} decoded from the bank."""
  flat = b.read_rows(b.rows_of(ids))
  return {i: {leaf: x[k] for leaf, x in flat.items()} for k, i in enumerate(ids)}


@functools.partial(jax.jit, static_argnames=("config", "lcfg"))
def _grad_one(params, theta, tokens, mask, *, config, lcfg):
  loss = lambda l: losses.lm_loss(params, l, tokens, mask, config=config,
                                  lora_config=lcfg)[0]
  return jax.grad(loss)(theta)


def direct_gradient(setup, text):
  """grad of L_LM on the unpadded document: the definition of a bank row."""
  params, theta, config, lcfg, tok, _ = setup
  tokens, mask, _ = compute.tokenize_documents(tok, [text], worker.MAX_LEN,
                                               worker.BUCKETS)[0]
  n = int(mask.sum())
  return compute.flatten(_grad_one(params, theta, tokens[None, :n], mask[None, :n],
                                   config=config, lcfg=lcfg))


# --- Tokenisation and codecs ---------------------------------------------------


def test_tokenize_documents_truncates_and_buckets():
  tok = ByteTokenizer()
  out = compute.tokenize_documents(tok, ["ab", "x" * 100], 40, (16, 32, 48))
  (t0, m0, cut0), (t1, m1, cut1) = out
  prefix = tok.encode("Passage 1: ab", add_bos=True)
  assert t0.shape == (16,) and t0.dtype == np.int32 and not cut0
  assert list(t0[:len(prefix)]) == prefix and m0.sum() == len(prefix)
  assert (t0[len(prefix):] == tok.pad_id).all() and not m0[len(prefix):].any()
  assert t1.shape == (48,) and cut1 and m1.sum() == 40
  with pytest.raises(TypeError, match="document 1"):
    compute.tokenize_documents(tok, ["ok", 3], 40, (48,))
  with pytest.raises(ValueError, match="bucket"):
    compute.tokenize_documents(tok, ["ok"], 40, (16, 32))


def _roundtrip(codec, x):
  parts = jax.device_get(jax.jit(codec.encode)(jnp.asarray(x)))
  for name, part in codec.parts(x.shape[1:]).items():
    assert parts[name].shape == (x.shape[0],) + part.shape, name
    assert np.dtype(parts[name].dtype).name == part.dtype, name
  return parts, codec.decode(parts, x.shape[1:])


@pytest.mark.parametrize("shape", [(3, 2, 40, 4), (3, 2, 4, 40)])  # LoRA A, B.
def test_codec_error_bounds(shape):
  rng = np.random.RandomState(0)
  # Heavy tails and per-component scales spanning 4 decades, like real gradients.
  x = rng.standard_t(3, size=shape).astype(np.float32)
  comp_axis = -1 if shape[-1] < shape[-2] else -2
  x *= np.logspace(-4, 0, min(shape[-2:])).reshape(
      (-1, 1) if comp_axis == -2 else (1, -1)).astype(np.float32)

  _, y = _roundtrip(codecs.Fp32(), x)
  np.testing.assert_array_equal(y, x)

  _, y = _roundtrip(codecs.Bf16(), x)
  assert (np.abs(y - x) <= 2.0**-8 * np.abs(x)).all()

  _, y = _roundtrip(codecs.Int8(), x)
  long_axis = -2 if shape[-2] >= shape[-1] else -1
  vmax = np.abs(x).max(axis=long_axis, keepdims=True)
  assert (np.abs(y - x) <= vmax / 254 * (1 + 1e-4)).all()
  # The per-component scale matters: one scale per matrix would lose the small ones.
  assert np.abs(y - x).max(axis=long_axis).min() < 1e-5

  parts, y = _roundtrip(codecs.QZstd(step=0.4), x)
  rms = np.sqrt(np.mean(x**2, axis=long_axis, keepdims=True))
  np.testing.assert_allclose(parts["scale"], np.maximum(0.4 * rms, vmax / 127), rtol=1e-5)
  assert (np.abs(y - x) <= parts["scale"] / 2 * (1 + 1e-5)).all()
  rel = np.sqrt(np.mean((y - x)**2, axis=long_axis) / np.mean(x**2, axis=long_axis))
  assert 0.6 < np.median(rel) / (0.4 / np.sqrt(12)) < 1.2  # Uniform error of step/sqrt(12).

  k = 2
  parts, y = _roundtrip(codecs.LowRank(k), x)
  mats = x if long_axis == -2 else np.swapaxes(x, -1, -2)
  s = np.linalg.svd(mats, compute_uv=False)  # (..., r)
  trunc = np.sqrt((s[..., k:] ** 2).sum(-1))
  m, r = mats.shape[-2:]
  e_p = np.sqrt(m * ((parts["p_scale"][..., 0, :] / 2) ** 2).sum(-1))
  e_q = np.sqrt(r * ((parts["q_scale"][..., 0, :] / 2) ** 2).sum(-1))
  bound = trunc + e_p + s[..., 0] * e_q + e_p * e_q
  err = np.sqrt(((y - x) ** 2).sum((-1, -2)))
  assert (err <= bound * (1 + 1e-4) + 1e-6).all()
  assert (err >= trunc * (1 - 1e-4)).all()  # Eckart-Young: no rank-k does better.

  # A gradient of rank <= k comes back up to quantisation error only.
  low = np.matmul(mats[..., :, :k], rng.randn(k, r).astype(np.float32))
  low = low if long_axis == -2 else np.swapaxes(low, -1, -2)
  _, y = _roundtrip(codecs.LowRank(k), low)
  rel = np.linalg.norm((y - low).reshape(3, -1), axis=1) / np.linalg.norm(
      low.reshape(3, -1), axis=1)
  assert rel.max() < 0.02


def test_codec_sizes_and_names():
  shapes = {"gate/a": (15, 576, 16), "gate/b": (15, 16, 1536)}
  fp32 = codecs.nbytes_per_row(codecs.Fp32(), shapes)
  assert fp32 == 4 * 15 * 16 * (576 + 1536)
  assert codecs.nbytes_per_row(codecs.Bf16(), shapes) * 2 == fp32
  assert 3.9 < fp32 / codecs.nbytes_per_row(codecs.Int8(), shapes) < 4
  assert fp32 / codecs.nbytes_per_row(codecs.LowRank(4), shapes) > 14
  for codec in (codecs.LowRank(3), codecs.QZstd(0.3, 5), codecs.Int8()):
    assert codecs.from_dict(codecs.make(**codec.to_dict()).to_dict()) == codec
  with pytest.raises(ValueError, match="unknown bank codec"):
    codecs.make("int4")


# --- Build, read, devices --------------------------------------------------------


def padded_doc(setup):
  """A fixture document shorter than its bucket (its padding must not count)."""
  tok, docs = setup[-2], setup[-1]
  length = lambda d: len(tok.encode("Passage 1: " + d[1], add_bos=True))
  return max((d for d in docs if length(d) < worker.MAX_LEN - 2), key=length)


def test_build_matches_direct_gradients(setup, built):
  b, report = built
  docs = setup[-1]
  assert report.computed == len(docs) == len(b) and report.appended == len(docs)
  assert b.ids == [i for i, _ in docs]
  assert sorted(b.rows_of(b.ids)) == list(range(len(docs)))
  doc_id, text = padded_doc(setup)
  want = direct_gradient(setup, text)
  stored = rows_by_id(b, [doc_id])[doc_id]
  for leaf, g in want.items():
    np.testing.assert_allclose(stored[leaf], g, rtol=1e-5, atol=1e-7)
  assert np.abs(want["gate/a"]).max() > 0  # B != 0: A's gradient is live.
  others = rows_by_id(b, [docs[-1][0]])[docs[-1][0]]  # A different document ...
  assert np.abs(others["gate/b"] - stored["gate/b"]).max() > 1e-4  # ... differs.


def test_micro_batches_and_remat_change_memory_only(setup):
  """The bank step's pieces (MICRO_BATCH) and remat policy (REMAT) are memory
  knobs: every split and policy gives the rows of one whole-batch pass."""
  params, theta, config, lcfg, tok, docs = setup
  tokenized = compute.tokenize_documents(tok, [d[1] for d in docs[:4]], worker.MAX_LEN,
                                         worker.BUCKETS)  # All in the 32 bucket.
  tokens, mask = (np.stack([row[i] for row in tokenized]) for i in (0, 1))
  step = lambda mb, remat: jax.jit(functools.partial(
      compute._doc_gradients, model_config=config, lora_config=lcfg,
      codec=codecs.Fp32(), micro_batch=mb, remat=remat))(params, theta, tokens, mask)
  (want, _, want_loss) = step(4, "none")
  for mb, remat in ((1, "dots"), (2, "none"), (2, "full")):
    got, finite, loss = step(mb, remat)
    assert finite.all()
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for leaf in want:
      np.testing.assert_allclose(got[leaf]["x"], want[leaf]["x"], rtol=1e-5, atol=1e-7)


def test_batches_pack_longest_first(computer4):
  texts = ["ab", "x" * 40, "cd", "y" * 10, "z" * 30] + ["w"] * 5  # Buckets 16 and 32.
  tokenized = computer4.tokenize(texts)
  rows = [7, 3, 5, 9, 4, 10, 11, 12, 13, 14]
  out = list(computer4.batches(rows, tokenized))
  # 10 documents at 8 a step: 2 steps, not one per bucket; longest (32) first.
  assert [b[0].tolist() for b in out] == [[3, 4, 9, 5, 7, 10, 11, 12], [13, 14]]
  assert [b[1].shape[1] for b in out] == [32, 16]
  for batch_rows, tokens, mask in out:
    assert tokens.shape[0] == mask.shape[0] == computer4.global_batch == 8
    assert mask[:len(batch_rows)].any(axis=1).all() and not mask[len(batch_rows):].any()
    for i, r in enumerate(batch_rows):  # Each document intact, then padding.
      t, m, _ = tokenized[rows.index(r)]
      np.testing.assert_array_equal(tokens[i, :len(t)], t)
      assert (mask[i, :len(m)] == m).all() and not mask[i, len(m):].any()


def test_gather_and_gather_sum(setup, built):
  b, _ = built
  ids = [d[0] for d in setup[-1]]
  queries = [ids[0:3], ids[3:6]]
  tree = b.gather(queries)
  rows = rows_by_id(b, ids[:6])
  for leaf, x in compute.flatten(tree).items():
    assert x.shape == (2, 3) + b.leaf_shapes[leaf] and x.dtype == np.float32
    np.testing.assert_array_equal(x[1, 2], rows[ids[5]][leaf])
  summed = compute.flatten(b.gather_sum([ids[0:3], ids[3:5], []]))
  for leaf, x in summed.items():
    assert x.shape == (3,) + b.leaf_shapes[leaf]
    np.testing.assert_allclose(x[1], rows[ids[3]][leaf] + rows[ids[4]][leaf], rtol=1e-6)
    assert not x[2].any()
  nothing = compute.flatten(b.gather_sum([[], []]))  # No ids at all: zeros, no read.
  assert all(x.shape == (2,) + b.leaf_shapes[leaf] and not x.any() for leaf, x in nothing.items())
  with pytest.raises(ValueError, match="same K"):
    b.gather([ids[:2], ids[:3]])
  with pytest.raises(KeyError, match="nope"):
    b.gather([["nope"]])
  with pytest.raises(TypeError, match="list of lists"):
    b.gather(ids[:3])


def test_four_devices_match_one(tmp_path, setup, built, computer1):
  b4, _ = built
  b1 = bank.Bank.open_for(tmp_path / "one", computer1)
  b1.build(setup[-1], computer1)
  assert b1.ids == b4.ids
  r1, r4 = rows_by_id(b1, b1.ids), rows_by_id(b4, b4.ids)
  for i in b1.ids:  # The same rows, up to XLA's partitioned fusion of the remat
    for leaf in r1[i]:  # recompute (float reassociation, ~1e-9 here).
      np.testing.assert_allclose(r1[i][leaf], r4[i][leaf], rtol=1e-5, atol=1e-8)


def test_transcode_codecs_within_bounds(tmp_path, built):
  src, _ = built
  ids = src.ids
  ref = rows_by_id(src, ids)
  sizes = {"fp32": src.size_bytes()}
  for codec in (codecs.Bf16(), codecs.Int8(), codecs.QZstd(), codecs.LowRank(2)):
    dst = src.transcode(tmp_path / codec.name, codec)
    assert dst.ids == ids and dst.identity == src.identity
    got = rows_by_id(bank.Bank.open(dst.path, identity=src.identity, codec=codec), ids)
    for i in ids:
      for leaf, x in ref[i].items():
        y = got[i][leaf]
        if codec.name == "bf16":
          assert (np.abs(y - x) <= 2.0**-8 * np.abs(x)).all()
        elif codec.name == "int8":
          axis = -2 if x.shape[-2] >= x.shape[-1] else -1
          assert (np.abs(y - x) <= np.abs(x).max(axis, keepdims=True) / 254 * 1.0001).all()
        elif codec.name == "qzstd":
          axis = -2 if x.shape[-2] >= x.shape[-1] else -1
          rms = np.sqrt(np.mean(x**2, axis, keepdims=True))
          assert (np.abs(y - x) <= 0.2 * rms * 1.0001 + 1e-12).all()
        else:
          assert np.linalg.norm(y - x) <= 0.6 * np.linalg.norm(x)
    # Per-query sums decode on the device (K gathers): they equal the decoded rows'
    # sums, for ragged queries and a document two queries share.
    queries = [ids[:3], ids[2:3], [ids[0], ids[0]]]
    summed = compute.flatten(dst.gather_sum(queries))
    for q, leaf in itertools.product(range(3), summed):
      np.testing.assert_allclose(summed[leaf][q], sum(got[i][leaf] for i in queries[q]),
                                 rtol=1e-5, atol=1e-7)
    sizes[codec.name] = dst.size_bytes()
    with pytest.raises(bank.BankMismatchError, match="codec"):
      bank.Bank.open(dst.path, codec=codecs.Fp32())
  assert sizes["fp32"] > sizes["bf16"] > sizes["int8"] > sizes["qzstd"]
  assert sizes["int8"] > sizes["lowrank"]


# --- Lifecycle -------------------------------------------------------------------


def test_append_replace_delete_keep_index_consistent(tmp_path, setup, computer4):
  docs = setup[-1]
  first, second = docs[:10], docs[10:16]
  b = bank.Bank.open_for(tmp_path / "b", computer4)
  assert b.build(first, computer4).appended == 10
  reader = bank.Bank.open(b.path, identity=computer4.identity)
  before = rows_by_id(reader, [first[0][0]])

  report = b.append(second, computer4)
  assert report.appended == 6 and report.computed == 6
  assert len(reader) == 10  # A reader sees a consistent snapshot ...
  reader.refresh()  # ... and the new rows once it refreshes.
  assert reader.ids == [d[0] for d in first + second]
  with pytest.raises(ValueError, match="use replace"):
    b.append(first[:1], computer4)

  # Replace: new text -> new row, the same id; readers keep the old row until then.
  doc_id = first[0][0]
  new_text = padded_doc(setup)[1][::-1]  # Same length: reuses a compiled shape.
  old_row = b.rows_of([doc_id])[0]
  report = b.replace([(doc_id, new_text)], computer4)
  assert report.replaced == 1 and report.computed == 1
  assert b.rows_of([doc_id])[0] == b.num_rows - 1 != old_row
  for leaf, g in direct_gradient(setup, new_text).items():
    np.testing.assert_allclose(rows_by_id(b, [doc_id])[doc_id][leaf], g,
                               rtol=1e-5, atol=1e-7)
  # The old row's data is untouched (rows are never rewritten).
  old = b.read_rows([old_row])
  np.testing.assert_array_equal(old["gate/b"][0], before[doc_id]["gate/b"])
  with pytest.raises(KeyError, match="use append"):
    b.replace([("never-seen", "text")], computer4)

  # build() with a changed text also replaces; with the same text it skips.
  report = b.build([(first[1][0], first[1][1] + " more"), first[2]], computer4)
  assert (report.replaced, report.skipped, report.computed) == (1, 1, 1)

  b.delete([first[3][0]])
  with pytest.raises(KeyError, match=first[3][0]):
    b.gather([[first[3][0]]])
  with pytest.raises(KeyError, match="not in the bank"):
    b.delete(["never-seen"])

  reopened = bank.Bank.open(b.path, identity=computer4.identity)
  live = reopened.ids
  assert len(live) == len(set(live)) == 15
  rows = reopened.rows_of(live)
  assert len(set(rows.tolist())) == len(rows)
  manifest = json.loads((b.path / "manifest.json").read_text())
  assert reopened.num_rows == len(manifest["ids"]) == 18
  assert set(manifest["deleted"]) == {old_row, 1, 3}  # Superseded + deleted rows.
  assert not list((b.path / "commits").iterdir())  # Every marker folded.
  # A deleted id can come back.
  assert b.build([first[3]], computer4).appended == 1 and first[3][0] in b


# --- Bad input -------------------------------------------------------------------


def test_bad_documents_are_refused_before_any_work(tmp_path, computer4):
  b = bank.Bank.open_for(tmp_path / "b", computer4)
  with pytest.raises(ValueError, match="empty documents.*'e'"):
    b.build([("a", "fine"), ("e", "  \n")], computer4)
  with pytest.raises(TypeError, match="'n'.*str"):
    b.build([("n", None)], computer4)
  with pytest.raises(TypeError, match="id must be"):
    b.build([(3, "text")], computer4)
  with pytest.raises(ValueError, match="duplicate document ids: \\['a'\\]"):
    b.build([("a", "one"), ("a", "two")], computer4)
  assert b.num_rows == 0 and not any((b.path / "commits").iterdir())


def test_long_documents_are_truncated_and_counted(setup, built):
  b, report = built
  _, _, _, _, tok, docs = setup
  n_long = sum(len(tok.encode("Passage 1: " + t, add_bos=True)) > worker.MAX_LEN
               for _, t in docs)
  assert n_long > 0
  assert report.truncated == b.num_truncated == n_long
  manifest = json.loads((b.path / "manifest.json").read_text())
  assert len(manifest["truncated"]) == n_long


def test_non_finite_gradient_row_is_refused(tmp_path, setup):
  # Untied embeddings: a NaN input row poisons only documents that contain "~".
  params, theta, config, lcfg, tok, docs = worker.fixture(
      config=setup[2].replace(tie_embeddings=False))
  params["embed"] = params["embed"].at[ord("~")].set(jnp.nan)
  computer = worker.make_computer((params, theta, config, lcfg, tok, docs),
                                  devices=jax.devices()[:4])
  b = bank.Bank.open_for(tmp_path / "b", computer)
  report = b.build([docs[0], ("bad", "a tilde ~ here"), docs[1]], computer)
  assert set(report.refused) == {"bad"} and "non-finite" in report.refused["bad"]
  assert report.computed == 2 and b.ids == [docs[0][0], docs[1][0]]
  assert b.refused == report.refused
  with pytest.raises(KeyError):
    b.gather([["bad"]])
  again = b.build([("bad", "a tilde ~ here")], computer)  # Not recomputed.
  assert again.computed == 0 and again.skipped == 1 and set(again.refused) == {"bad"}


def test_mismatched_bank_is_refused(tmp_path, setup, built, computer4):
  b, _ = built
  params, theta, config, lcfg, tok, docs = setup
  other_theta = jax.tree.map(lambda x: x * 1.5, theta)
  other = worker.make_computer((params, other_theta, config, lcfg, tok, docs),
                               devices=jax.devices()[:4])
  with pytest.raises(bank.BankMismatchError, match=r"theta\*") as e:
    bank.Bank.open(b.path, identity=other.identity)
  assert "tokenizer" not in str(e.value) and "base model" not in str(e.value)
  with pytest.raises(bank.BankMismatchError, match=r"theta\*"):
    b.build(docs[:1], other)

  class OtherTokenizer(ByteTokenizer):
    def fingerprint(self):
      return "other"
  other_tok = worker.make_computer((params, theta, config, lcfg, OtherTokenizer(), docs),
                                   devices=jax.devices()[:4])
  with pytest.raises(bank.BankMismatchError, match="tokenizer") as e:
    bank.Bank.open(b.path, identity=other_tok.identity)
  assert r"theta*" not in str(e.value)
  other_params = jax.tree.map(lambda x: x + 1e-3, params)
  ident = compute.Identity.of(other_params, config, theta, lcfg, tok, 48)
  with pytest.raises(bank.BankMismatchError, match="base model.*max context length"):
    bank.Bank.open(b.path, identity=ident)
  with pytest.raises(bank.BankMismatchError, match="codec"):
    b.build(docs[:1], worker.make_computer(setup, devices=jax.devices()[:4], codec="int8"))
  with pytest.raises(FileNotFoundError, match="no gradient bank"):
    bank.Bank.open(tmp_path / "nothing")


# --- Crash and resume ------------------------------------------------------------


def test_sigkilled_build_resumes_exactly(tmp_path, setup, computer1):
  """Kill a build mid-way (SIGKILL), read while it runs, restart, compare."""
  path = tmp_path / "killed"
  proc = subprocess.Popen(
      [sys.executable, str(REPO / "tests" / "_bank_worker.py"), "--bank", str(path),
       "--batch_size", "2", "--sleep", "0.5"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
  try:
    deadline = time.time() + 400  # Generous: the worker compiles on a busy machine.
    markers = []
    while time.time() < deadline and proc.poll() is None:
      markers = list((path / "commits").glob("*.json")) if path.exists() else []
      if len(markers) >= 3:
        break
      time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    # A reader sees the committed rows while the build is still running.
    reader = bank.Bank.open(path, identity=computer1.identity)
    assert 6 <= len(reader) < len(setup[-1])
    some = reader.gather([reader.ids[:2]])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(some))
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == -signal.SIGKILL

  b = bank.Bank.open(path, identity=computer1.identity)
  done_before = len(b)
  assert 0 < done_before < len(setup[-1])
  report = b.build(setup[-1], computer1)
  assert report.computed == len(setup[-1]) - done_before
  assert report.appended == 0  # Rows were reserved by the killed run.
  fresh = bank.Bank.open_for(tmp_path / "fresh", computer1)
  fresh.build(setup[-1], computer1)
  assert b.ids == fresh.ids and b.num_rows == len(setup[-1])
  got, want = rows_by_id(b, b.ids), rows_by_id(fresh, fresh.ids)
  for i in b.ids:
    for leaf in want[i]:
      np.testing.assert_array_equal(got[i][leaf], want[i][leaf])


def test_identity_names_bf16_matmuls_and_keeps_older_banks_readable():
  """A bank's identity covers matmul_dtype (bf16 gradients are other bytes), but
  at its float32 default the config fingerprints as before the field existed."""
  from regrad_jax.bank.compute import _config_repr
  from regrad_jax.model.config import tiny_config
  cfg = tiny_config()
  assert "matmul_dtype" not in _config_repr(cfg)
  assert _config_repr(cfg) == repr(cfg).replace(", matmul_dtype='float32'", "")
  assert "matmul_dtype='bfloat16'" in _config_repr(cfg.replace(matmul_dtype="bfloat16"))
