"""`trainer.train` for 2 steps in its own process, for tests/test_multihost.py.

  python tests/_multihost_worker.py --out DIR [--devices N]
      [--num_processes P --process_id I --port PORT]

Meta-trains the tiny model on configs/tiny.py's training tasks (4 tasks per
meta-batch, one per device of the global mesh) with workdir DIR/workdir (orbax
checkpoints every step, meta_state, metrics.jsonl: collective saves on every
process, files by process 0) and writes to DIR/p<process_index>/ the initial and
final meta state (init_NNN.npy, meta_NNN.npy, one per leaf in `jax.tree.leaves`
order). With P > 1 the process joins a jax.distributed job through the
environment variables a multi-node launch sets (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), read by `parallel.maybe_initialize_distributed`.
JAX is imported only after the device flags are set.
"""
import argparse
import json
import os
import pathlib
import sys

STEPS = 2
TASKS = 4  # = meta.batch_size of configs/tiny.py: one task per device of 4.


def tiny_config(distributed: bool):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  c = tiny.get_config(f"steps={STEPS}")
  c.meta.num_train_tasks = TASKS  # Both steps see the same tasks: one jit shape.
  c.meta.eval_every = STEPS  # One dev evaluation (greedy answers), at the end.
  c.meta.num_eval = 4
  c.meta.checkpoint_every = 1
  c.distributed = distributed
  return c


def run(config, workdir):
  """-> (initial meta, final meta) of `trainer.train` (NumPy trees)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from regrad_jax import parallel  # pylint: disable=g-import-not-at-top
  from regrad_jax.meta import objective, trainer  # pylint: disable=g-import-not-at-top
  from regrad_jax.model import LoraConfig, init_lora, loaders  # pylint: disable=g-import-not-at-top

  _, model_cfg, _ = loaders.load_model(config.model)
  theta = init_lora(jax.random.key(config.seed), model_cfg,
                    LoraConfig.from_config(config.lora, model_cfg))
  init = {"theta": theta, "alpha": objective.init_alpha(
      theta, config.meta.alpha_mode, config.meta.alpha_init)}
  meta = trainer.train(config, workdir)["meta"]
  host = lambda tree: jax.tree.map(lambda x: np.asarray(parallel.to_host(x)), tree)
  return host(init), host(meta)


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--devices", type=int, default=2)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  args = parser.parse_args(argv)

  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  if args.num_processes > 1:
    os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{args.port}",
                      JAX_NUM_PROCESSES=str(args.num_processes),
                      JAX_PROCESS_ID=str(args.process_id))
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if "REGRAD_TEST_JAX_CACHE" in os.environ:  # Reruns reuse tests/conftest.py's cache.
    jax.config.update("jax_compilation_cache_dir", os.environ["REGRAD_TEST_JAX_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  from regrad_jax import parallel  # pylint: disable=g-import-not-at-top

  config = tiny_config(args.num_processes > 1)
  parallel.maybe_initialize_distributed(config.distributed)  # As the launches do.
  init, meta = run(config, pathlib.Path(args.out) / "workdir")
  out = pathlib.Path(args.out) / f"p{jax.process_index()}"
  out.mkdir(parents=True, exist_ok=True)
  for name, tree in (("init", init), ("meta", meta)):
    for i, leaf in enumerate(jax.tree.leaves(tree)):
      np.save(out / f"{name}_{i:03d}.npy", leaf)
  print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                    "devices": jax.device_count(),
                    "local_devices": jax.local_device_count()}),
        flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main(sys.argv[1:])
