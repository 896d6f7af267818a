"""A bank build in its own process, for the kill/resume and multi-process tests.

  python tests/_bank_worker.py --bank DIR [--devices N] [--batch_size B]
      [--sleep S] [--num_processes P --process_id I --port PORT] [--kb]

Builds the tiny fixture bank (the same `fixture()` the tests import) and prints one
JSON line with the report. `--sleep` pauses after each committed batch so a test
can kill the build mid-way; `--kb` commits the documents to a knowledge base in
--bank's parent instead (regrad_jax/kb.py, long documents chunked). JAX is imported
only after the device flags are set.
"""
import argparse
import json
import os
import sys

MAX_LEN = 32
BUCKETS = (16, 32)
WORDS = ("alpha", "beta", "gamma", "delta", "river", "stone", "castle", "seven",
         "blue", "quiet", "north", "maple", "engine", "harbor", "violet", "owl")


def kb_chunking():
  from regrad_jax import kb  # pylint: disable=g-import-not-at-top
  return kb.Chunking(mode="chunk", max_len=MAX_LEN, overlap=4)


def fixture(num_docs: int = 24, config=None):
  """(params, theta, model_config, lora_config, tokenizer, docs) for bank tests.

  A 4-layer random model, LoRA on layers [2, 4) with a nonzero B (so A's gradient
  is nonzero too, as at a meta-learned theta*), and documents of 18 to 90 tokens:
  all land in the 32-token bucket (one jit shape keeps the tests fast), and the
  longer half is truncated to MAX_LEN.
  """
  import jax
  import numpy as np
  from regrad_jax.model import config as model_config_lib
  from regrad_jax.model import lora as lora_lib
  from regrad_jax.model import transformer
  from regrad_jax.model.tokenizer import ByteTokenizer

  config = config or model_config_lib.tiny_config()
  lcfg = lora_lib.LoraConfig(rank=4, alpha=8.0, start=2, stop=4)
  # NumPy values in the model's own shapes: no jax.random compiles, which cost
  # seconds in every fresh worker process.
  rng = np.random.RandomState(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      return jax.numpy.ones(leaf.shape, leaf.dtype)
    scale = 0.1 if name.endswith("['b']") else 0.2 if name.endswith("['a']") else 0.02
    return jax.numpy.asarray(scale * rng.randn(*leaf.shape), leaf.dtype)

  params = jax.tree_util.tree_map_with_path(fill, transformer.param_shapes(config))
  theta = jax.tree_util.tree_map_with_path(fill, jax.eval_shape(
      lambda k: lora_lib.init_lora(k, config, lcfg), jax.random.key(0)))
  rng, docs = np.random.RandomState(1), []
  for i in range(num_docs):
    words = rng.choice(WORDS, size=1 + (i * 5) % 13)
    docs.append((f"doc-{i:02d}", " ".join(words)))
  return params, theta, config, lcfg, ByteTokenizer(), docs


def make_computer(setup, *, devices=None, batch_size: int = 2, codec: str = "fp32"):
  import jax
  from regrad_jax import bank
  from regrad_jax import parallel
  params, theta, config, lcfg, tok, _ = setup
  mesh = parallel.make_mesh(devices=devices or jax.local_devices())
  return bank.GradientComputer(params, theta, model_config=config, lora_config=lcfg,
                               tokenizer=tok, codec=bank.codecs.make(codec),
                               max_len=MAX_LEN, buckets=BUCKETS,
                               batch_size=batch_size, mesh=mesh)


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("--bank", required=True)
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--batch_size", type=int, default=2)
  parser.add_argument("--sleep", type=float, default=0.0)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--kb", action="store_true")
  args = parser.parse_args(argv)

  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if args.num_processes > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                               num_processes=args.num_processes,
                               process_id=args.process_id)
  from regrad_jax import bank  # pylint: disable=g-import-not-at-top

  setup = fixture()
  computer = make_computer(setup, batch_size=args.batch_size)
  if args.kb:
    from regrad_jax import kb  # pylint: disable=g-import-not-at-top
    base = kb.KnowledgeBase.open_for(os.path.dirname(args.bank), computer)
    report = base.add(setup[-1], computer, kb_chunking())
    print(json.dumps({"process": jax.process_index(), "passages": len(base.bank.ids),
                      "documents": len(base.documents),
                      "computed": report.bank.computed}), flush=True)
    return
  b = bank.Bank.open_for(args.bank, computer)
  on_batch = (lambda _: time.sleep(args.sleep)) if args.sleep else None
  report = b.build(setup[-1], computer, on_batch=on_batch)
  print(json.dumps({"process": jax.process_index(), "computed": report.computed,
                    "appended": report.appended, "skipped": report.skipped,
                    "ids": len(b)}), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main(sys.argv[1:])
