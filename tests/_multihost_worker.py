"""Two meta-training steps in their own process, for tests/test_multihost.py.

  python tests/_multihost_worker.py --out DIR [--devices N]
      [--num_processes P --process_id I --port PORT]

Runs 2 steps of `trainer.make_step` with the tiny model on configs/tiny.py's
training tasks and optimiser (4 tasks per meta-batch, one per device of the global
mesh) and writes to OUT/p<process_index>/: the initial and final meta state
(init_NNN.npy, meta_NNN.npy, one per leaf in `jax.tree.leaves` order) and
losses.npy. With P > 1 the process joins a jax.distributed job through the
environment variables a multi-node launch sets (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), read by `parallel.maybe_initialize_distributed`.

This is the loop of `trainer.train` without its checkpoints and meta_state (see
the test's docstring for why), written the multi-host way: every process builds
the same full meta-batch in NumPy and hands JAX only the rows its own devices hold
(`jax.make_array_from_callback`), so the batch is one global array over the mesh.
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
  c.distributed = distributed
  return c


def global_batch(batch: dict, sharding) -> dict:
  """The full host meta-batch (identical on every process) -> global jax.Arrays.

  Each process copies only the rows of its addressable devices; unlike
  `jax.device_put` of a host array onto a multi-process sharding, nothing is
  gathered across hosts to check that the processes agree.
  """
  import jax  # pylint: disable=g-import-not-at-top
  return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
          for k, v in batch.items()}


def run(config, steps: int):
  """-> (initial meta, final meta, per-step losses) after `steps` meta-steps.

  The model and theta are tests/_bank_worker.fixture()'s tiny model (NumPy
  values: no jax.random compiles, seconds saved in every fresh process; a
  nonzero LoRA B, so every meta-gradient is nonzero); tasks, alpha and the
  optimiser come from `config`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from regrad_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from regrad_jax import parallel  # pylint: disable=g-import-not-at-top
  from regrad_jax.meta import objective  # pylint: disable=g-import-not-at-top
  from regrad_jax.meta import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from regrad_jax.meta import trainer  # pylint: disable=g-import-not-at-top
  from tests import _bank_worker  # pylint: disable=g-import-not-at-top

  mc, dc = config.meta, config.data
  params, theta, model_cfg, lcfg, tokenizer, _ = _bank_worker.fixture()
  docs, recs = data_lib.load_split(config, "train")
  tasks = tasks_lib.build_tasks(recs[:mc.num_train_tasks], docs, tokenizer, k=mc.k,
                                mode=mc.mode, max_context_len=dc.max_context_len,
                                seed=config.seed)
  mesh = parallel.mesh_from_config(config)  # Over jax.devices(): all processes'.
  meta = {"theta": theta,
          "alpha": objective.init_alpha(theta, mc.alpha_mode, mc.alpha_init)}
  init = jax.tree.map(np.asarray, meta)
  tx = trainer.make_optimizer(mc, mc.num_steps)
  step_fn = trainer.make_step(mesh, tx, config=model_cfg, lora_config=lcfg,
                              alpha_mode=mc.alpha_mode, first_order=mc.first_order,
                              remat=mc.remat)
  replicated = parallel.replicated(mesh)
  # The same values on every process (device_put checks that they agree).
  params, meta = jax.device_put((params, meta), replicated)
  opt_state = jax.device_put(tx.init(meta), replicated)
  losses = []
  for step in range(steps):
    idx = trainer.batch_indices(config.seed, step, mc.batch_size, len(tasks))
    batch = tasks_lib.collate([tasks[i] for i in idx], doc_buckets=dc.doc_buckets,
                              qa_buckets=dc.qa_buckets, pad_id=tokenizer.pad_id)
    meta, opt_state, m = step_fn(meta, opt_state, params,
                                 global_batch(batch, parallel.data_sharded(mesh)))
    losses.append(float(m["loss"]))  # Replicated: read from a local shard.
  return init, jax.tree.map(np.asarray, meta), losses


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
  init, meta, losses = run(config, STEPS)
  out = pathlib.Path(args.out) / f"p{jax.process_index()}"
  out.mkdir(parents=True, exist_ok=True)
  for name, tree in (("init", init), ("meta", meta)):
    for i, leaf in enumerate(jax.tree.leaves(tree)):
      np.save(out / f"{name}_{i:03d}.npy", leaf)
  np.save(out / "losses.npy", np.asarray(losses, np.float32))
  print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                    "devices": jax.device_count(),
                    "local_devices": jax.local_device_count(), "losses": losses}),
        flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main(sys.argv[1:])
