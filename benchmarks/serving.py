r"""Query-time costs: ScaNN vs brute force, and ReGrad's latency split vs RAG/closed-book.

  python -m benchmarks.serving [--config=configs/smollm2_cpkc.py:ctx=96] [--vectors=100000]

Part 1 (retrieval): ScaNN with the config's knobs vs exact search over N random unit
vectors (d=384, MiniLM's width): queries/s and recall@10 (by distance, with a tolerance).
Part 2 (answering, SmolLM2-135M with the released meta-state): a bank of cpkc test
passages; per batch of Q=16 queries the time of retrieve / gather / adapt / generate for
ReGrad, against RAG (passages in the prompt) and closed-book generation, and the
ReGrad engine's throughput on the 16 queries as one batch vs one query per call.
"""
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import regrad_jax
from benchmarks import common
from regrad_jax import data as data_lib, kb as kb_lib, prompts
from regrad_jax.adapt import ReGrad
from regrad_jax.meta import objective
from regrad_jax.model import decode, generation
from regrad_jax.retrieval import index as index_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_cpkc.py:ctx=96")
_VECTORS = flags.DEFINE_integer("vectors", 100_000, "Vectors in the retrieval part.")
_DOCS = flags.DEFINE_integer("docs", 32, "Bank documents in the answering part.")
_SINGLE = flags.DEFINE_bool("single", True, "Also time the engine one query per call.")


def _unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def retrieval_part(config, n, d=384, q=1000):
  """ScaNN vs exact search on two kinds of unit vectors: uniformly random (no
  structure: the tree must search most leaves to reach the recall target) and
  clustered (1,000 topics, as real document embeddings are)."""
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((1000, d))
  kinds = {"random": _unit(rng.standard_normal((n, d))),
           "clustered": _unit(centres[rng.integers(0, 1000, n)] +
                              0.6 * rng.standard_normal((n, d)))}
  print(f"retrieval, {n} vectors x {d}, {q} queries, recall target "
        f"{config.retrieval.scann.recall_target}:")
  for kind, db in kinds.items():
    queries = _unit(db[rng.choice(n, q, replace=False)] +
                    0.1 * rng.standard_normal((q, d)))
    t0 = time.perf_counter()
    scann = index_lib.ScannIndex.from_config(config.retrieval.scann)
    scann.build([str(i) for i in range(n)], None, db)
    build_s = time.perf_counter() - t0
    scann_s = common.median_time(lambda: scann.search(queries, 10), repeats=3)
    exact_s = common.median_time(lambda: index_lib.exact_search(db, queries, 10), repeats=3)
    got, want = scann.search(queries, 10)[1], index_lib.exact_search(db, queries, 10)[1]
    # Recall by distance: a hit scores at least the 10th exact score (minus a tolerance).
    recall = float(np.mean(got >= want[:, -1:] - 1e-4))
    print(f"  {kind:9s} ScaNN {q / scann_s:7.0f} q/s  exact {q / exact_s:7.0f} q/s  "
          f"ratio {exact_s / scann_s:5.1f}x  recall@10 {recall:.3f}  (built in "
          f"{build_s:.0f} s, {scann.tuned_leaves_to_search} leaves searched)")


def answering_part(config, n_docs):
  if not config.meta.init_from:  # SmolLM2's released state unless one is named.
    config.meta.init_from = str(regrad_jax.released("smollm2_135m_cpkc"))
  docs, recs = data_lib.load_split(config, "test")
  docs, questions = docs[:n_docs], [r.question for r in recs[:16]]
  config.adapt.batch_size = len(questions)
  engine = ReGrad.from_config(config, tempfile.mkdtemp(), documents=docs,
                              chunking=kb_lib.Chunking.from_config(config, mode="truncate"))
  (params, mcfg, tok), (theta, alpha, lcfg) = engine.model, (
      engine.meta.theta, engine.meta.alpha, engine.meta.lora_config)
  bank, retriever = engine.bank, engine.retriever
  k, Q, new = config.adapt.k, len(questions), config.adapt.max_new_tokens

  ids, _ = retriever.search(questions, k)
  sums = bank.gather_sum(ids)
  tokens, mask = generation.encode_prompts(tok, [prompts.qa_prompt(q, tok) for q in questions])
  # RAG reads each passage cut to the length a banked gradient sees (as baselines.rag).
  texts = {d.id: prompts.truncate_text(tok, d.text, config.data.max_context_len)
           for d in docs}
  rag_t, rag_m = generation.encode_prompts(
      tok, [prompts.qa_prompt(q, tok, [texts[i] for i in row]) for q, row in zip(questions, ids)])
  adapt = jax.jit(objective.batched_adapt)
  lora = adapt(theta, alpha, sums, np.float32(1.0))
  gen = lambda t, m, lo=None: decode.generate(params, t, m, config=mcfg, lora=lo,
                                               lora_config=lcfg if lo is not None else None,
                                               max_new_tokens=new)
  one_lora = jax.tree.map(lambda x: x[:, :1], lora)  # Query 0 alone: B=1 decoding.
  first = {"generate_b16": common.timed(lambda: gen(tokens, mask, lora), repeats=0)[0],
           "generate_b1": common.timed(lambda: gen(tokens[:1], mask[:1], one_lora),
                                       repeats=0)[0]}  # Compile (or cache read) + run.
  times = {
      "retrieve": common.median_time(lambda: retriever.search(questions, k)[1], repeats=3),
      "gather": common.median_time(lambda: bank.gather_sum(ids), repeats=3),
      "adapt": common.median_time(lambda: adapt(theta, alpha, sums, np.float32(1.0)), repeats=3),
      "generate": common.median_time(lambda: gen(tokens, mask, lora), repeats=3),
  }
  times["generate_b1"] = common.median_time(
      lambda: gen(tokens[:1], mask[:1], one_lora), repeats=3)
  rag = common.median_time(lambda: gen(rag_t, rag_m), repeats=3)
  closed = common.median_time(lambda: gen(tokens, mask), repeats=3)
  overhead = times["retrieve"] + times["gather"] + times["adapt"]
  print(f"answering, SmolLM2-135M, Q={Q} queries x k={k} of {n_docs} banked docs, "
        f"{new} new tokens, prompts {tokens.shape[1]} (RAG {rag_t.shape[1]}) tokens:")
  for name, s in times.items():
    print(f"  ReGrad {name:9s} {s * 1e3:9.1f} ms/batch  {s / Q * 1e3:8.1f} ms/query")
  print(f"  retrieve+gather+adapt = {overhead / times['generate']:.1%} of generation")
  print(f"  RAG generate     {rag * 1e3:9.1f} ms/batch   closed-book {closed * 1e3:9.1f} ms/batch")
  # Decoding stops when every answer has ended: the longest answer sets the cost.
  longest = lambda out: int((np.asarray(out) != mcfg.pad_id).sum(1).max())
  print(f"  longest answer (tokens): ReGrad {longest(gen(tokens, mask, lora))}, "
        f"RAG {longest(gen(rag_t, rag_m))}, closed-book {longest(gen(tokens, mask))}")

  # Serving throughput through the user-facing engine (retrieve, gather, adapt,
  # generate, detokenise): batches of 16 vs the same queries one per call.
  batched = common.median_time(lambda: engine.answer(questions), repeats=3)
  figures = {f"{k}_s": v for k, v in times.items()}
  figures.update(rag_generate_s=rag, closed_generate_s=closed, queries=Q,
                 prompt_len=int(tokens.shape[1]), batched_qps=Q / batched,
                 **{f"first_{k}_s": v for k, v in first.items()})
  if _SINGLE.value:
    engine.batch_size = 1
    single = common.median_time(lambda: [engine.answer([q]) for q in questions],
                                repeats=1)
    figures["single_qps"] = Q / single
    print(f"  engine.answer batched {Q / batched:.2f} q/s vs one-at-a-time "
          f"{Q / single:.2f} q/s: {single / batched:.1f}x")
  return figures


def main(argv):
  del argv
  config = _CONFIG.value
  if _VECTORS.value:
    retrieval_part(config, _VECTORS.value)
  common.emit(**answering_part(config, _DOCS.value))


if __name__ == "__main__":
  app.run(main)
