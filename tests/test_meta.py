"""Meta-learning: second-order gradients, alpha modes, training, resume, sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny

from regrad_jax import parallel
from regrad_jax.data.records import Document, QARecord
from regrad_jax.meta import objective, state, tasks as tasks_lib, trainer
from regrad_jax.model import LoraConfig, init_lora, init_params, tiny_config
from regrad_jax.model.tokenizer import ByteTokenizer

CFG = tiny_config()
LCFG = LoraConfig(rank=4, alpha=8.0, start=2, stop=4)
TOK = ByteTokenizer()


def _family(n=8):
  docs = [Document(f"d{i}", f"The capital of Land{i} is City{i}.") for i in range(n)]
  recs = [QARecord(f"q{i}", f"What is the capital of Land{i}?", (f"City{i}",), f"d{i}")
          for i in range(n)]
  return tasks_lib.build_tasks(recs, docs, TOK, k=2, mode="blind", max_context_len=64)


@pytest.fixture(scope="module")
def setup():
  params = init_params(jax.random.key(0), CFG)
  theta = init_lora(jax.random.key(1), CFG, LCFG)
  # Nonzero B so that the A-gradients (proportional to B) are not all zero.
  theta = jax.tree.map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), theta)
  batch = tasks_lib.collate(_family()[:4], doc_buckets=(64,), qa_buckets=(64,),
                            pad_id=TOK.pad_id)
  return params, theta, batch


def _loss_fn(params, task, **kw):
  return lambda m: objective.task_loss(m, params, task, config=CFG,
                                       lora_config=LCFG, **kw)


def test_meta_gradient_matches_finite_differences(setup):
  params, theta, batch = setup
  task = jax.tree.map(lambda x: x[0], batch)
  meta = {"theta": theta, "alpha": objective.init_alpha(theta, "tie", 0.5)}
  f = _loss_fn(params, task)
  grads = jax.jit(jax.grad(f))(meta)
  for part in ("theta", "alpha"):  # Directional derivative along each part.
    v = jax.tree.map(lambda x: jnp.zeros_like(x), meta)
    v[part] = jax.tree.map(
        lambda x: jax.random.normal(jax.random.key(5), x.shape), meta[part])
    analytic = sum(float(jnp.vdot(g, d)) for g, d in
                   zip(jax.tree.leaves(grads), jax.tree.leaves(v)))
    eps = 3e-3
    shift = lambda s: jax.tree.map(lambda a, b: a + s * eps * b, meta, v)
    numeric = float((f(shift(1)) - f(shift(-1))) / (2 * eps))
    assert abs(numeric - analytic) <= 2e-2 * abs(analytic) + 1e-4, (part, numeric, analytic)
  # The outer gradient flows through the inner gradient: first-order differs.
  first = jax.jit(jax.grad(_loss_fn(params, task, first_order=True)))(meta)
  diff = max(float(jnp.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(first), jax.tree.leaves(grads)))
  assert diff > 1e-4


@pytest.mark.parametrize("remat", ["dots", "full", True])
def test_remat_modes_give_the_same_meta_gradient(setup, remat):
  """Rematerialising the adapted layers (config.meta.remat) changes memory and
  time only: the second-order loss and gradient are those of remat="none"."""
  params, theta, batch = setup
  task = jax.tree.map(lambda x: x[0], batch)
  meta = {"theta": theta, "alpha": objective.init_alpha(theta, "tie", 0.5)}
  ref_loss, ref = jax.jit(jax.value_and_grad(_loss_fn(params, task, remat="none")))(meta)
  loss, grads = jax.jit(jax.value_and_grad(_loss_fn(params, task, remat=remat)))(meta)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)


def test_bf16_matmul_meta_gradient_is_close(setup):
  """The second-order meta-gradient differentiates through the bf16 matmuls'
  custom backward rule: within bf16 rounding of the float32 meta-gradient."""
  params, theta, batch = setup
  task = jax.tree.map(lambda x: x[0], batch)
  meta = {"theta": theta, "alpha": objective.init_alpha(theta, "tie", 0.5)}
  ref = jax.jit(jax.grad(_loss_fn(params, task)))(meta)
  bf = lambda m: objective.task_loss(m, params, task, config=CFG.replace(
      matmul_dtype="bfloat16"), lora_config=LCFG)
  got = jax.jit(jax.grad(bf))(meta)
  num = sum(float(jnp.sum((g - r) ** 2)) for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
  den = sum(float(jnp.sum(r ** 2)) for r in jax.tree.leaves(ref))
  assert 0 < num ** 0.5 < 0.05 * den ** 0.5


def _scan_outputs(jaxpr):
  """Shapes of every scan output anywhere in a closed jaxpr (the stacked residuals)."""
  out = []
  for e in jaxpr.eqns:
    if e.primitive.name == "scan":
      out += [tuple(v.aval.shape) for v in e.outvars]
    for v in e.params.values():
      for sub in v if isinstance(v, (list, tuple)) else [v]:
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          out += _scan_outputs(sub)
  return out


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_meta_gradient_stacks_no_layer_weights(setup, remat):
  """Under remat the second-order pass recomputes, rather than saves, the adapted
  layers' weights: no scan stacks a (layers, d_in, d_out) copy of them (with one
  checkpoint the meta-gradient's pass over the inner forward did, for every layer),
  and under "full" not the MLP activations either (stacked without remat)."""
  params, theta, batch = setup
  task = jax.tree.map(lambda x: x[0], batch)
  meta = {"theta": theta, "alpha": objective.init_alpha(theta, "tie", 0.5)}
  n = LCFG.stop - LCFG.start
  # gate/up (d_model, d_ff) and k (d_model, kv): shapes no activation here has
  # (down's (d_ff, d_model) is also a (64-token, d_model) activation's).
  weights = {(n,) + tuple(params["layers"][name].shape[1:]) for name in ("gate", "k")}
  mlp = (n,) + task["doc_tokens"].shape + (CFG.d_ff,)  # (layers, k, S, d_ff).
  stacked = lambda r: set(_scan_outputs(
      jax.make_jaxpr(jax.grad(_loss_fn(params, task, remat=r)))(meta).jaxpr))
  assert mlp in stacked("none")  # The check sees residuals where they are saved.
  got = stacked(remat)
  assert not weights & got
  assert (mlp in got) == (remat == "dots")  # "dots" saves matmul outputs.


def test_alpha_mode_shapes(setup):
  _, theta, _ = setup
  tie = objective.init_alpha(theta, "tie", 0.01)
  assert tie["gate"]["a"].shape == (2, 1, 1)
  full = objective.init_alpha(theta, "full", 0.01)
  assert full["down"]["b"].shape == theta["down"]["b"].shape
  assert objective.init_alpha(theta, "same", 0.01).shape == ()
  with pytest.raises(ValueError, match="alpha mode"):
    objective.init_alpha(theta, "nope", 0.01)


def _run_steps(params, theta, batch, mode, steps, lr, mesh, schedule_steps=12):
  """Runs `steps` meta-steps; returns the meta state after step 2 and the losses."""
  import ml_collections
  mc = ml_collections.ConfigDict(dict(
      lr=lr, warmup_frac=0.1, warmup_start_factor=0.01, weight_decay=0.0,
      clip_norm=0.5, alpha_mode=mode))
  tx = trainer.make_optimizer(mc, schedule_steps)
  step = trainer.make_step(mesh, tx, config=CFG, lora_config=LCFG, alpha_mode=mode)
  meta = {"theta": theta, "alpha": objective.init_alpha(theta, mode, 0.5)}
  opt = tx.init(meta)
  losses, after_two = [], None
  for i in range(steps):
    meta, opt, m = step(meta, opt, params, batch)
    losses.append(float(m["loss"]))
    if i == 1:
      after_two = meta
  return after_two, meta, losses


@pytest.fixture(scope="module")
def runs(setup):
  """12 fix-mode steps on 1 device, and the same schedule's first 2 on 4 devices."""
  params, theta, batch = setup
  one = _run_steps(params, theta, batch, "fix", 12, 3e-2,
                   parallel.make_mesh(devices=jax.devices()[:1]))
  four = _run_steps(params, theta, batch, "fix", 2, 3e-2,
                    parallel.make_mesh(devices=jax.devices()[:4]))
  return one, four


def test_fix_mode_keeps_alpha_and_training_reduces_loss(setup, runs):
  _, theta, _ = setup
  (_, meta, losses), _ = runs
  for a in jax.tree.leaves(meta["alpha"]):
    np.testing.assert_array_equal(a, 0.5)
  assert not np.allclose(meta["theta"]["up"]["b"], theta["up"]["b"])
  # Meta-training on a fixed task family: the outer loss falls.
  assert losses[-1] < losses[0] - 0.25, losses


def test_sharded_step_equals_single_device(runs):
  assert len(jax.devices()) >= 4
  (one, _, l1), (four, _, l4) = runs
  np.testing.assert_allclose(l1[:2], l4, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_batch_indices_cover_each_epoch():
  idx = np.concatenate([trainer.batch_indices(0, s, 4, 8) for s in range(2)])
  assert sorted(idx.tolist()) == list(range(8))
  np.testing.assert_array_equal(trainer.batch_indices(0, 1, 4, 8),
                                trainer.batch_indices(0, 1, 4, 8))


def test_answer_chunk_tasks_show_the_chunk_that_holds_the_answer():
  """meta.passages="answer_chunk": a gold document whose first max_context_len
  tokens lack the answer is shown as its banked chunk that holds it; one whose
  head holds it is unchanged; neighbours are untouched."""
  from regrad_jax import kb as kb_lib
  filler = " ".join(f"word{i}" for i in range(40))
  docs = [Document("far", f"{filler} The mayor is Ann Bell."),
          Document("near", f"Ann Cole is the mayor. {filler}")]
  recs = [QARecord("q0", "Who is the mayor?", ("Ann Bell",), "far"),
          QARecord("q1", "Who is the mayor here?", ("Ann Cole",), "near")]
  chunking = kb_lib.Chunking("chunk", 64, 8)
  kw = dict(k=2, mode="blind", max_context_len=64)
  first = tasks_lib.build_tasks(recs, docs, TOK, **kw)
  chunked = tasks_lib.build_tasks(recs, docs, TOK, chunking=chunking, **kw)
  gold = lambda task, rec: task.doc_ids[task.passages.index(
      next(p for p in task.passages if rec.answers[0] in p))]
  assert "Ann Bell" not in TOK.decode(gold(first[0], recs[0]))
  assert "Ann Bell" in TOK.decode(gold(chunked[0], recs[0]))
  assert docs[1].text in chunked[0].passages  # The neighbour: whole, as before.
  assert chunked[1].passages == first[1].passages
  with pytest.raises(ValueError, match="needs meta.tasks='gold'"):
    tasks_lib.build_tasks(recs, docs, TOK, chunking=chunking, selection="reference", **kw)


def test_collate_refuses_tasks_longer_than_buckets():
  with pytest.raises(ValueError, match="qa_buckets"):
    tasks_lib.collate(_family()[:2], doc_buckets=(64,), qa_buckets=(16,), pad_id=0)


def _tiny_config(steps):
  c = tiny.get_config(f"steps={steps}")
  c.meta.eval_every = 0
  c.meta.checkpoint_every = 2
  c.meta.num_train_tasks = 16
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, meta) of an uninterrupted 4-step tiny run."""
  workdir = tmp_path_factory.mktemp("straight")
  return workdir, trainer.train(_tiny_config(4), workdir)["meta"]


def test_resume_equals_uninterrupted(tmp_path, trained):
  straight = trained[1]
  trainer.train(_tiny_config(4), tmp_path / "b", stop_after=2)
  resumed = trainer.train(_tiny_config(4), tmp_path / "b")["meta"]
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  theta, _, info = state.load(tmp_path / "b" / "meta_state")
  assert info["step"] == 4 and info["base_fingerprint"]
  np.testing.assert_array_equal(theta["up"]["b"], np.asarray(resumed["theta"]["up"]["b"]))


def test_resume_refuses_a_different_run_config(tmp_path):
  """Resuming under other training flags would silently continue another run's
  optimiser state: refused, naming the field; checkpoint cadence may change."""
  trainer.train(_tiny_config(4), tmp_path, stop_after=2)
  other = _tiny_config(4)
  other.meta.lr = 0.5
  with pytest.raises(ValueError, match=r"meta\.lr: 0\.\d+ -> 0\.5"):
    trainer.train(other, tmp_path)
  assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["2"]  # Nothing lost.
  other = _tiny_config(4)
  other.meta.checkpoint_every = 4
  assert trainer.train(other, tmp_path, stop_after=1)["last"]["step"] == 3


def test_ablation_conditions(trained):
  """The ablation's closed-book row is the base model exactly; the gradient moves
  the meta-learned state's answers; ICL tasks put the passages in the prompt."""
  from regrad_jax import data as data_lib
  from regrad_jax.meta import ablation
  from regrad_jax.model import losses, loaders
  config, workdir = _tiny_config(4), trained[0]
  config.meta.num_eval = 2  # Held out: dev records 2-5.
  rows = ablation.run(config, workdir, num=4, raw_steps=(0.5,))
  assert list(rows) == ["closed_book", "raw_grad:0.5", "theta_only", "regrad", "rag",
                        "regrad_icl"]
  assert all(r["n"] == 4 and np.isfinite(r["loss"]) for r in rows.values())
  params, cfg, tok = loaders.load_model(config.model)
  docs, recs = data_lib.load_split(config, "dev")
  tasks = tasks_lib.build_tasks(recs[2:6], docs, tok, k=config.meta.k, mode="blind",
                                max_context_len=config.data.max_context_len)
  b = tasks_lib.collate(tasks, doc_buckets=config.data.doc_buckets,
                        qa_buckets=config.data.qa_buckets, pad_id=tok.pad_id)
  base = losses.answer_loss(params, None, b["qa_tokens"], b["qa_mask"],
                            b["target_mask"], config=cfg)
  np.testing.assert_allclose(rows["closed_book"]["loss"], float(np.mean(base)), rtol=1e-5)
  assert rows["regrad"]["loss"] != rows["theta_only"]["loss"]
  assert rows["raw_grad:0.5"]["loss"] != rows["closed_book"]["loss"]
  assert rows["rag"]["loss"] != rows["closed_book"]["loss"]
  assert all(0.0 <= r["acc"] <= 100.0 for r in rows.values())
  assert "| EM | F1 | acc |" in ablation.table(rows)


def test_task_offset_continues_the_task_stream(tmp_path, trained):
  """A stage started at task_offset=n draws the tasks the seed's order gives
  steps n, n+1, ... (not those the earlier stage already saw)."""
  import json
  c = _tiny_config(1)
  c.meta.task_offset = 3
  trainer.train(c, tmp_path)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  straight = [json.loads(l) for l in (trained[0] / "metrics.jsonl").read_text().splitlines()]
  assert lines[-1]["tasks"] == straight[3]["tasks"] != straight[0]["tasks"]
  assert state.load(tmp_path / "meta_state")[2]["task_offset"] == 3
