"""Meshes, shardings and multi-host start-up: the one place for device layout.

A 2-D mesh ("data", "model") is built from the config. Documents, tasks and queries
are split over "data"; large weight matrices may be split over "model" by the
logical-axis rules below (on a single CPU or GPU "model" has size 1 and every
parameter is replicated): each param carries logical axis names
(nn.with_logical_partitioning in model/transformer.py) and LOGICAL_RULES maps
them onto the mesh. Mesh axes are Auto (the sharding-in-types Explicit mode
changes the semantics of shard_map and sharding constraints, and this code relies
on jit's propagation from in/out shardings).
"""
import os

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"

# Logical axis name (the decoder's param annotations, transformer.logical_axes)
# -> mesh axis, the t5x / MaxText way: vocabulary, attention heads and the MLP
# width split over "model"; the residual width and the layer stack stay whole.
LOGICAL_RULES = (
    ("vocab", MODEL),
    ("heads", MODEL),
    ("kv", MODEL),
    ("mlp", MODEL),
    ("embed", None),
    ("layers", None),
)


def maybe_initialize_distributed(enabled: bool) -> None:
  """Calls jax.distributed.initialize() once when asked.

  Coordinator address, process count and id come from the environment
  (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) or, on Cloud TPU and
  SLURM, are auto-detected by JAX. Must run before any other JAX call.
  """
  if not enabled or jax.distributed.is_initialized():
    return
  kw = {}
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    kw = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
              num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
              process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kw)
  logging.info("process %d/%d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
  """A ("data", "model") mesh over all (global) devices; -1 fills the data axis."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  if data == -1:
    if n % model:
      raise ValueError(f"{n} devices are not divisible by model={model}")
    data = n // model
  if data * model != n:
    raise ValueError(f"mesh data={data} x model={model} != {n} devices")
  grid = np.asarray(devices).reshape(data, model)
  return Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


def mesh_from_config(config) -> Mesh:
  """`make_mesh` with config.mesh.data x config.mesh.model (data -1: fill)."""
  return make_mesh(int(config.mesh.data), int(config.mesh.model))


def param_specs(logical, rules=LOGICAL_RULES):
  """Logical axis names (a PartitionSpec of names per leaf, as from
  transformer.logical_axes) -> mesh PartitionSpecs by `rules`."""
  return jax.tree.map(lambda names: nn.logical_to_mesh_axes(names, rules), logical,
                      is_leaf=lambda x: isinstance(x, P))


def param_shardings(params, mesh: Mesh, logical, rules=LOGICAL_RULES):
  """NamedShardings for params; replicated where a dim does not divide evenly."""
  def fit(leaf, spec):
    dims = list(spec) + [None] * (leaf.ndim - len(spec))
    for i, axis in enumerate(dims):
      if axis is not None and leaf.shape[i] % mesh.shape[axis]:
        dims[i] = None
    return NamedSharding(mesh, P(*dims))
  return jax.tree.map(fit, params, param_specs(logical, rules))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of `mesh`."""
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Leading axis split over "data" (batches of documents, tasks, queries)."""
  return NamedSharding(mesh, P(DATA))


def global_array(tree, sharding: NamedSharding):
  """Host values, identical on every process -> global jax.Arrays on `sharding`.

  Each process copies only the slices its own devices hold, so nothing is sent
  between hosts (single-process: the same as jax.device_put).
  """
  return jax.tree.map(lambda v: jax.make_array_from_callback(
      np.shape(v), sharding, lambda idx: np.asarray(v)[idx]), tree)


def to_host(x: jax.Array) -> np.ndarray:
  """A replicated (possibly multi-process) array -> NumPy, from a local copy."""
  return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def shard_params(params, mesh: Mesh, logical):
  """Places params on the mesh by their logical axes and the rules (a new tree;
  the input is untouched). logical: e.g. transformer.logical_axes(config)."""
  return jax.device_put(params, param_shardings(params, mesh, logical))


def process_slice(n: int) -> slice:
  """This process's contiguous share of n items (multi-host: each process loads,
  computes and writes only its rows)."""
  per = -(-n // jax.process_count())
  start = jax.process_index() * per
  return slice(min(start, n), min(start + per, n))


def is_chief() -> bool:
  """Process 0 alone writes manifests, checkpoint metadata and logs."""
  return jax.process_index() == 0
