"""One knowledge-base write in its own process, SIGKILLed at a chosen point.

  python tests/_kb_worker.py --workdir W --op inject|remove|replace|build
      --kill_at bank|catalog|index|tombstone

`--kill_at` names where the process kills itself (SIGKILL: no cleanup runs):
  bank       the bank rows are committed, the catalog commit has not started
  catalog    inside the catalog write, before its rename (the commit point)
  index      the catalog is committed, the index files are written, its
             current.json (the index's commit point) is not
  tombstone  remove: the catalog is committed, the bank rows not yet tombstoned
It prints "survived" if the point was never reached. Also holds the tiny test
knowledge base (`config`, `make_state`, NEW_DOC ...) the tests import.
"""
import argparse
import os
import signal
import sys

NEW_DOC = ("new-fact", "The river Oxlen flows into the lake Parmit near Tollwick.")
REMOVE_ID = "tiny-032"
REPLACE = ("tiny-032", "Drilquaes was founded by Mirabel. The people speak Oxlenic.")


def config():
  """The tiny config with exact (fp32) rows and BM25 (deterministic) retrieval."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  c.bank.codec = "fp32"
  c.retrieval.backend = "bm25"
  c.adapt.k = 2
  c.adapt.max_new_tokens = 4
  return c


def make_state(cfg, workdir) -> None:
  """A random theta* (nonzero B, so gradients are live) saved as WORKDIR/meta_state."""
  import jax  # pylint: disable=g-import-not-at-top
  from regrad_jax.meta import objective, state  # pylint: disable=g-import-not-at-top
  from regrad_jax.model import LoraConfig, init_lora, loaders  # pylint: disable=g-import-not-at-top
  params, mcfg, tok = loaders.load_model(cfg.model)
  lcfg = LoraConfig.from_config(cfg.lora, mcfg)
  theta = init_lora(jax.random.key(1), mcfg, lcfg)
  theta = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape),
                       theta)
  from regrad_jax import fingerprint  # pylint: disable=g-import-not-at-top
  info = {"lora": {"rank": lcfg.rank, "alpha": lcfg.alpha, "start": lcfg.start,
                   "stop": lcfg.stop, "targets": list(lcfg.targets)},
          "base_fingerprint": fingerprint.tree_fingerprint(params),
          "tokenizer_fingerprint": tok.fingerprint()}
  state.save(os.path.join(workdir, "meta_state"), theta,
             objective.init_alpha(theta, "tie", 0.5), info)


def _kill(*_, **__):
  os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
  """Makes the process SIGKILL itself at `point` (see the module docstring)."""
  from regrad_jax.bank import bank as bank_lib  # pylint: disable=g-import-not-at-top
  from regrad_jax.bank import catalog  # pylint: disable=g-import-not-at-top
  from regrad_jax.retrieval import retriever  # pylint: disable=g-import-not-at-top
  if point == "bank":
    catalog.Catalog.commit = _kill
  elif point == "catalog":
    original = catalog._write_new  # pylint: disable=protected-access

    def write_then_die(path, source, write):
      def change(con):
        write(con)
        _kill()
      original(path, source, change)
    catalog._write_new = write_then_die  # pylint: disable=protected-access
  elif point == "index":
    atomic = retriever.store.write_json_atomic

    def die_at_current(path, obj):
      if str(path).endswith("current.json"):
        _kill()
      atomic(path, obj)
    retriever.store.write_json_atomic = die_at_current
  elif point == "tombstone":
    bank_lib.Bank.delete = _kill
  else:
    raise ValueError(f"unknown kill point {point!r}")


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--op", required=True)
  parser.add_argument("--kill_at", required=True)
  args = parser.parse_args(argv)
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir",
                    os.environ.get("REGRAD_TEST_JAX_CACHE", "/tmp/regrad_jax_test_cache"))
  from regrad_jax import kb  # pylint: disable=g-import-not-at-top
  from regrad_jax.adapt import ReGrad  # pylint: disable=g-import-not-at-top
  from regrad_jax.bank import pipeline  # pylint: disable=g-import-not-at-top

  cfg = config()
  install(args.kill_at)
  if args.op == "build":
    pipeline.build_from_config(cfg, args.workdir, progress=False)
  else:
    engine = ReGrad.load(args.workdir, cfg)
    if args.op == "inject":
      engine.inject([NEW_DOC])
    elif args.op == "remove":
      engine.remove([REMOVE_ID])
    elif args.op == "replace":
      engine.kb.add([REPLACE], engine.computer, kb.Chunking.from_config(cfg))
    else:
      raise ValueError(f"unknown op {args.op!r}")
  print("survived", flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main(sys.argv[1:])
