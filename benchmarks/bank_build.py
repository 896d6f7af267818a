r"""Gradient Bank on SmolLM2-135M: build speed, bytes, read latency, codec fidelity.

  python -m benchmarks.bank_build [--config=configs/smollm2_cpkc.py] [--docs=160] \
      [--questions=48] [--meta_state=WORKDIR/meta_state] [--workdir=/tmp/bank_bench]

In one run, on the first --docs passages of the dev split:
1. Documents/s of the full build path (Bank.build: tokenise, bucket, sharded
   per-document value_and_grad, encode, TensorStore writes, markers, manifest)
   against two bare loops over the same documents and buckets, without storage:
   one document per call (the faster of a jitted value_and_grad and the bank's
   own step at batch 1) and the bank's own jitted step called batch after batch. Compilation is excluded everywhere;
   the paths alternate over --rounds chunks of the documents (fair under a
   changing machine load).
2. For every codec (the fp32 bank is transcoded): bytes per document on disk,
   the relative error of each document's gradient and of the K=3 sums the
   adaptation uses, and the latency of reading K=3 rows (one query, and 16
   queries in one batched read).
3. The dev QA F1 of ReGrad (BM25 top config.adapt.k over the banked documents, theta_q =
   theta* - gamma alpha (.) sum_k g_k, greedy) with each codec against fp32, and
   the share of answers identical to fp32's. Without --meta_state theta* is a
   stand-in (PEFT init with a small random B, alpha at config.meta.alpha_init):
   its F1 says little about the method, but codec-induced changes still show.
Results are printed as they come and written to WORKDIR/bank_bench.json.
"""
import json
import pathlib
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common
from regrad_jax import bank as bank_lib
from regrad_jax import data as data_lib
from regrad_jax import metrics
from regrad_jax import parallel
from regrad_jax import prompts
from regrad_jax.adapt import online
from regrad_jax.bank import codecs
from regrad_jax.meta import objective
from regrad_jax.meta import state as state_lib
from regrad_jax.model import LoraConfig, init_lora, loaders, losses
from regrad_jax.retrieval import bm25

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_cpkc.py")
_DOCS = flags.DEFINE_integer("docs", 160, "Dev passages to bank.")
_QUESTIONS = flags.DEFINE_integer("questions", 48, "Dev questions for the F1 check.")
_META = flags.DEFINE_string("meta_state", "", "Meta-learned state ('' = stand-in).")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where banks go ('' = a temp dir).")
_CODECS = flags.DEFINE_list(
    "codecs", ["bf16", "int8", "qzstd:0.3", "qzstd:0.4", "qzstd:0.5", "lowrank:4",
               "lowrank:8"], "Codecs to compare with fp32 (name[:step or rank]).")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Chunks the timed paths alternate over.")
_TIME_BUILDS = flags.DEFINE_bool(
    "time_builds", True, "Time the build paths (else reuse WORKDIR's banks).")
_PATHS = flags.DEFINE_list(
    "paths", ["bare_per_doc", "bare_batched", "full_default", "full_fp32"],
    "Build paths to time (one alone in a fresh process gives its own peak RSS).")
_BUILD_ONLY = flags.DEFINE_bool("build_only", False, "Stop after timing the build "
                                "paths (no codecs, no F1).")
_F1 = flags.DEFINE_bool("f1", True, "Answer the questions with every codec (off: "
                        "bytes, fidelity and read latency only).")
_K = 3


def parse_codec(spec: str):
  name, _, arg = spec.partition(":")
  if not arg:
    return codecs.make(name)
  return codecs.make(name, rank=int(arg)) if name == "lowrank" else codecs.make(
      name, step=float(arg))


def codec_label(codec) -> str:
  d = codec.to_dict()
  return d["name"] + "".join(f":{v}" for k, v in d.items() if k not in ("name", "level"))


def meta_state(config, params, model_cfg, tokenizer):
  """(theta*, alpha, LoraConfig, description) from --meta_state or a stand-in."""
  if _META.value:
    theta, alpha, info = state_lib.load(
        _META.value, expect_base=loaders.base_fingerprint(params),
        expect_tokenizer=tokenizer.fingerprint())
    return (jax.tree.map(jnp.asarray, theta), jax.tree.map(jnp.asarray, alpha),
            state_lib.lora_config_from_info(info), f"meta state {_META.value}")
  lcfg = LoraConfig.from_config(config.lora, model_cfg)
  theta = init_lora(jax.random.key(0), model_cfg, lcfg)
  keys = iter(jax.random.split(jax.random.key(1), 16))
  theta = {k: {"a": ab["a"], "b": 0.02 * jax.random.normal(next(keys), ab["b"].shape)}
           for k, ab in theta.items()}
  alpha = objective.init_alpha(theta, config.meta.alpha_mode, config.meta.alpha_init)
  return theta, alpha, lcfg, "stand-in theta* (PEFT A, B ~ N(0, 0.02^2))"


def time_build_paths(params, theta, model_cfg, lcfg, computers, docs, workdir,
                     rounds: int) -> tuple[dict, dict]:
  """docs/s of the full build path and of two bare loops, compilation excluded.

  The documents are split into `rounds` chunks and the paths take turns chunk by
  chunk, so a change of machine load hits all of them alike. The full path
  appends each chunk to a bank (one build call per chunk).

  Returns:
    ({path: docs/s}, {computer name: the bank it built}).
  """
  @jax.jit
  def plain(params, theta, tokens, mask):
    return jax.value_and_grad(lambda l: losses.lm_loss(
        params, l, tokens, mask, config=model_cfg, lora_config=lcfg)[0])(theta)

  # The one-document baseline is the faster of a plain jitted value_and_grad and
  # the bank's own step at batch 1 (fp32, no storage): the bank's batched build
  # is compared with the best one-document loop, not with a slow one.
  single = bank_lib.GradientComputer(
      params, theta, model_config=model_cfg, lora_config=lcfg,
      tokenizer=computers["default"].tokenizer, codec=codecs.Fp32(),
      max_len=computers["default"].max_len, buckets=computers["default"].buckets,
      batch_size=1, mesh=parallel.make_mesh(devices=jax.local_devices()[:1]))
  per_doc = {"bare_per_doc_plain": lambda t, m: plain(params, theta, t, m),
             "bare_per_doc_step": single}
  main = computers["default"]
  tokenized = main.tokenize([d.text for d in docs])
  want = set(_PATHS.value)
  timed_per_doc = {k: f for k, f in per_doc.items() if "bare_per_doc" in want}
  for length in sorted({len(t) for t, _, _ in tokenized}):  # Compile every shape.
    z = np.zeros((1, length), np.int32)
    for f in timed_per_doc.values():
      jax.block_until_ready(f(z, z.astype(bool)))
    for name, c in computers.items():
      if want & {f"full_{name}", "bare_batched"}:
        g = c.global_batch
        jax.block_until_ready(c(np.zeros((g, length), np.int32),
                                np.zeros((g, length), bool)))
  banks = {}
  for name, c in computers.items():
    shutil.rmtree(workdir / f"build_{name}", ignore_errors=True)
    banks[name] = bank_lib.Bank.open_for(workdir / f"build_{name}", c)
  seconds = dict.fromkeys([*timed_per_doc, *(want - {"bare_per_doc"})], 0.0)
  for chunk in np.array_split(np.arange(len(docs)), rounds):
    for name, f in timed_per_doc.items():
      t0 = time.perf_counter()
      for i in chunk:
        out = f(tokenized[i][0][None], tokenized[i][1][None])
      jax.block_until_ready(out)
      seconds[name] += time.perf_counter() - t0
    if "bare_batched" in want:
      t0 = time.perf_counter()
      for _, tokens, mask in main.batches(chunk, [tokenized[i] for i in chunk]):
        out = main(tokens, mask)
      jax.block_until_ready(out)
      seconds["bare_batched"] += time.perf_counter() - t0
    for name, c in computers.items():
      if f"full_{name}" in want:
        seconds[f"full_{name}"] += banks[name].build([docs[i] for i in chunk], c).seconds
  speed = {k: len(docs) / v for k, v in seconds.items()}
  if timed_per_doc:
    speed["bare_per_doc"] = max(speed[k] for k in timed_per_doc)
  return speed, banks


def read_latency(b, ids, rng) -> dict:
  """Median ms to gather_sum K=3 rows: one query; 16 queries in one read."""
  one, many = [], []
  for _ in range(15):
    q = [list(rng.choice(ids, _K, replace=False))]
    t0 = time.perf_counter()
    b.gather_sum(q)
    one.append(time.perf_counter() - t0)
    qs = [list(rng.choice(ids, _K, replace=False)) for _ in range(16)]
    t0 = time.perf_counter()
    b.gather_sum(qs)
    many.append(time.perf_counter() - t0)
  return {"read_k3_ms": 1e3 * statistics.median(one),
          "read_16x_k3_ms": 1e3 * statistics.median(many)}


def fidelity(b, ref, ids, retrieved) -> dict:
  """Relative L2 error per document and per retrieved K=3 sum, against fp32."""
  rows, ref_rows = b.read_rows(b.rows_of(ids)), ref.read_rows(ref.rows_of(ids))
  err = sum(np.sum((rows[k] - ref_rows[k]) ** 2, axis=tuple(range(1, rows[k].ndim)))
            for k in rows)
  norm = sum(np.sum(ref_rows[k] ** 2, axis=tuple(range(1, rows[k].ndim))) for k in rows)
  per_doc = np.sqrt(err / norm)
  s, s_ref = bank_lib.flatten(b.gather_sum(retrieved)), bank_lib.flatten(
      ref.gather_sum(retrieved))
  e = sum(np.sum((s[k] - s_ref[k]) ** 2, axis=tuple(range(1, s[k].ndim))) for k in s)
  n = sum(np.sum(s_ref[k] ** 2, axis=tuple(range(1, s[k].ndim))) for k in s)
  return {"rel_err_median": float(np.median(per_doc)), "rel_err_max": float(per_doc.max()),
          "sum_rel_err_median": float(np.median(np.sqrt(e / n)))}


def answer_all(b, questions, retrieved, params, theta, alpha, model_cfg, lcfg,
               tokenizer, config) -> list[str]:
  """Greedy answers with theta_q from `b`'s gradients (b None: theta* itself)."""
  ids = [prompts.encode_qa(tokenizer, q)[0] for q in questions]
  width = next(L for L in sorted(config.data.qa_buckets) if L >= max(map(len, ids)))
  bs, out = int(config.adapt.batch_size), []
  for start in range(0, len(ids), bs):
    chunk = ids[start:start + bs]
    tokens = np.full((bs, width), tokenizer.pad_id, np.int32)
    mask = np.zeros((bs, width), bool)
    for i, row in enumerate(chunk):
      tokens[i, :len(row)], mask[i, :len(row)] = row, True
    queries = retrieved[start:start + bs] + [retrieved[0]] * (bs - len(chunk))
    sums = b.gather_sum(queries) if b is not None else jax.tree.map(
        lambda x: np.zeros((bs,) + x.shape, np.float32), theta)
    new = online.generate_adapted(
        params, theta, alpha, sums, tokens, mask, jnp.float32(config.adapt.gamma),
        config=model_cfg, lora_config=lcfg,
        max_new_tokens=int(config.adapt.max_new_tokens))
    out += [tokenizer.decode(r).strip() for r in np.asarray(new)[:len(chunk)]]
  return out


def main(argv):
  del argv
  config = _CONFIG.value
  workdir = pathlib.Path(_WORKDIR.value or tempfile.mkdtemp(prefix="bank_bench_"))
  workdir.mkdir(parents=True, exist_ok=True)
  params, model_cfg, tokenizer = loaders.load_model(config.model)
  theta, alpha, lcfg, theta_desc = meta_state(config, params, model_cfg, tokenizer)
  split_docs, records = data_lib.load_split(config, "dev")
  by_id = {d.id: d for d in split_docs}
  gold = dict.fromkeys(r.passage_id for r in records if r.passage_id in by_id)
  docs = [by_id[i] for i in gold][:_DOCS.value]
  banked = {d.id for d in docs}
  questions = [r for r in records if r.passage_id in banked][:_QUESTIONS.value]

  def computer(codec):
    return bank_lib.GradientComputer(
        params, theta, model_config=model_cfg, lora_config=lcfg, tokenizer=tokenizer,
        codec=codec, max_len=config.data.max_context_len,
        buckets=config.data.doc_buckets, batch_size=config.bank.batch_size)

  fp32 = computer(codecs.Fp32())
  default = computer(codecs.from_config(config.bank))
  tokenized = fp32.tokenize([d.text for d in docs])
  print(f"{len(docs)} dev passages, tokens per document: median "
        f"{np.median([m.sum() for _, m, _ in tokenized]):.0f}, "
        f"{sum(c for _, _, c in tokenized)} truncated to {config.data.max_context_len}; "
        f"{theta_desc}; {jax.device_count()} device(s)")
  out = {"docs": len(docs), "questions": len(questions), "theta": theta_desc,
         "default_codec": codec_label(default.codec), "codecs": {}}
  save = lambda: (workdir / "bank_bench.json").write_text(json.dumps(out, indent=2))
  computers = {"default": default, "fp32": fp32}
  if _TIME_BUILDS.value:
    speed, banks = time_build_paths(params, theta, model_cfg, lcfg, computers, docs,
                                    workdir, _ROUNDS.value)
    for bare in ("bare_per_doc", "bare_batched"):
      if bare in speed and "full_default" in speed:
        speed[f"ratio_vs_{bare[5:]}"] = speed["full_default"] / speed[bare]
    out["speed"] = speed
    print("\nbuild, docs/s (batch %d, %s): " % (config.bank.batch_size,
                                                codec_label(default.codec))
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(speed.items())), flush=True)
    save()
    if _BUILD_ONLY.value:
      common.emit(docs=len(docs), batch_size=int(config.bank.batch_size), **speed)
      return
  else:  # Reuse (or resume) the banks of an earlier run in the same workdir.
    banks = {}
    for name, c in computers.items():
      banks[name] = bank_lib.Bank.open_for(workdir / f"build_{name}", c)
      banks[name].build(docs, c, progress=True)

  index = bm25.BM25Index()
  index.build([d.id for d in docs], [d.text for d in docs])
  k = config.adapt.k  # Documents per question (the reads above use K=3).
  retrieved, _ = index.search([q.question for q in questions], k)
  ids = [d.id for d in docs]
  ref = banks["fp32"]
  fp32_bytes = ref.size_bytes() / len(ref)
  built = banks["default"]  # The default codec's bank, from the build path.
  out["default_built"] = {"bytes_per_doc": built.size_bytes() / len(built),
                          **fidelity(built, ref, ids, retrieved)}
  d = out["default_built"]
  print(f"default codec as built: {d['bytes_per_doc'] / 1e6:.3f} MB/doc "
        f"({fp32_bytes / d['bytes_per_doc']:.1f}x smaller than fp32), relative error "
        f"{d['rel_err_median']:.4f} (median)")

  rng = np.random.RandomState(0)
  answer = lambda b: answer_all(b, [q.question for q in questions], retrieved, params,
                                theta, alpha, model_cfg, lcfg, tokenizer, config)
  golds = [q.answers for q in questions]
  if not _F1.value:  # Bytes, fidelity and reads only.
    answer = lambda b: [""] * len(questions)
  out["no_gradients"] = metrics.aggregate(answer(None), golds)
  print(f"\n{len(questions)} dev questions, BM25 top-{k}; theta* alone (no "
        f"gradients): F1 {out['no_gradients']['f1']:.1f}\n")
  print("| codec | MB/doc | x smaller | rel err (median / max) | K=3 sum rel err | "
        "read K=3 ms | 16 queries ms | F1 | dF1 vs fp32 | same answers |")
  print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
  base_answers = answer(ref)
  for spec in ["fp32"] + list(_CODECS.value):
    if spec == "fp32":
      b, preds, err = ref, base_answers, {"rel_err_median": 0.0, "rel_err_max": 0.0,
                                          "sum_rel_err_median": 0.0}
    else:
      path = workdir / f"codec_{spec.replace(':', '_')}"
      shutil.rmtree(path, ignore_errors=True)
      b = ref.transcode(path, parse_codec(spec))
      preds, err = answer(b), fidelity(b, ref, ids, retrieved)
    r = {"bytes_per_doc": b.size_bytes() / len(b), **read_latency(b, ids, rng), **err,
         **metrics.aggregate(preds, golds),
         "same_answers": float(np.mean([p == q for p, q in zip(preds, base_answers)]))}
    out["codecs"][codec_label(b.codec)] = r
    save()
    dF1 = r["f1"] - out["codecs"]["fp32"]["f1"]
    print(f"| {codec_label(b.codec)} | {r['bytes_per_doc'] / 1e6:.3f} | "
          f"{fp32_bytes / r['bytes_per_doc']:.1f} | {r['rel_err_median']:.4f} / "
          f"{r['rel_err_max']:.4f} | {r['sum_rel_err_median']:.4f} | "
          f"{r['read_k3_ms']:.1f} | {r['read_16x_k3_ms']:.1f} | {r['f1']:.1f} | "
          f"{dF1:+.1f} | {100 * r['same_answers']:.0f}% |", flush=True)
  print(f"\nwritten {workdir / 'bank_bench.json'}")
  common.emit(**{f"{c}_{m}": r[m] for c, r in out["codecs"].items()
                 for m in ("read_k3_ms", "read_16x_k3_ms", "bytes_per_doc")},
              **out.get("speed", {}))


if __name__ == "__main__":
  app.run(main)
