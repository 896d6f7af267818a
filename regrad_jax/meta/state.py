"""The meta-learned state theta*, alpha: saved with orbax plus a JSON description.

Layout of a state directory:
  DIR/arrays/   orbax StandardCheckpointer tree {"theta": LoRA tree, "alpha": ...}
  DIR/info.json lora config, alpha mode, fingerprints of the base weights and the
                tokenizer, the training step and dev metrics, and the config.
The bank, the evaluation and the quickstart refuse a state whose base-weight or
tokenizer fingerprint differs from the model they run.

`save_tree` / `load_tree` are the same format for any tree of arrays (the
fine-tuned baselines' adapters, baselines/finetuned.py, are saved with them:
DIR/arrays holds {"lora": ...}); `save` / `load` are the meta state's view, and
`load_for` gives the `MetaState` checked against the model that will use it.
"""
import json
import pathlib
from typing import Any

import jax
import numpy as np
from flax import struct

from regrad_jax.model.lora import LoraConfig


@struct.dataclass
class MetaState:
  """theta*, alpha and the LoRA layout they belong to, travelling together.

  A pytree (theta and alpha are its leaves; the LoraConfig is static), so it can
  be passed through jit as one argument.

  Attributes:
    theta: the LoRA tree {target: {"a": (L', d_in, r), "b": (L', r, d_out)}} over
      the L' adapted layers.
    alpha: step sizes: a scalar, or a tree shaped like theta (objective.init_alpha).
    lora_config: the LoraConfig of theta (rank, scale, layer range, targets).
  """
  theta: dict
  alpha: Any
  lora_config: LoraConfig = struct.field(pytree_node=False)


def save_tree(path, tree: dict, info: dict) -> None:
  """Writes a tree of arrays (DIR/arrays) and info (DIR/info.json) to `path`
  (replaced if present).

  Every process of a multi-host job calls this (orbax saves are collective);
  process 0 alone writes info.json.
  """
  import orbax.checkpoint as ocp  # Lazy: 0.15-0.5 s of start-up for any importer.
  path = pathlib.Path(path).absolute()
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(path / "arrays", tree, force=True)
  ckpt.wait_until_finished()
  if jax.process_index() == 0:
    (path / "info.json").write_text(json.dumps(info, indent=2, sort_keys=True))


def save(path, theta: dict, alpha, info: dict) -> None:
  """Writes theta, alpha and info to `path` (replaced if present); see save_tree."""
  save_tree(path, {"theta": theta, "alpha": alpha}, info)


def load_tree(path, *, expect_base: str | None = None,
              expect_tokenizer: str | None = None, what: str = "meta state"
              ) -> tuple[dict, dict]:
  """Reads a directory written by save_tree -> (NumPy-backed tree, info).

  what: names the kind of state in error messages.
  Raises:
    FileNotFoundError: nothing saved at `path`.
    ValueError: the state was trained on different base weights or tokenizer.
  """
  path = pathlib.Path(path).absolute()
  if not (path / "info.json").exists():
    raise FileNotFoundError(f"no {what} at {path} (missing info.json)")
  info = json.loads((path / "info.json").read_text())
  check_info(info, path, expect_base, expect_tokenizer, what)
  # Restore into host NumPy arrays shaped from the metadata: a state saved by a
  # multi-process job reads back in one process (and vice versa).
  import orbax.checkpoint as ocp  # Lazy, as in save.
  ckpt = ocp.StandardCheckpointer()
  meta = ckpt.metadata(path / "arrays").item_metadata.tree
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), meta,
                        is_leaf=lambda x: hasattr(x, "shape"))
  return jax.tree.map(np.asarray, ckpt.restore(path / "arrays", target)), info


def check_info(info: dict, path, expect_base: str | None, expect_tokenizer: str | None,
               what: str = "meta-learned state") -> None:
  """ValueError unless info's base / tokenizer fingerprints are those expected."""
  for name, want in (("base_fingerprint", expect_base),
                     ("tokenizer_fingerprint", expect_tokenizer)):
    if want is not None and info.get(name) != want:
      raise ValueError(f"{what} at {path} was trained with {name}="
                       f"{info.get(name)}, but the model here has {want}")


def load(path, *, expect_base: str | None = None,
         expect_tokenizer: str | None = None):
  """Reads a meta state directory -> (theta, alpha, info) as NumPy-backed trees.

  Raises:
    FileNotFoundError: no state at `path`.
    ValueError: the state was meta-learned on different base weights or tokenizer.
  """
  tree, info = load_tree(path, expect_base=expect_base, expect_tokenizer=expect_tokenizer,
                         what="meta-learned state")
  return tree["theta"], tree["alpha"], info


def lora_info(lcfg: LoraConfig) -> dict:
  """The "lora" entry of an info.json (inverse of lora_config_from_info)."""
  return {"rank": lcfg.rank, "alpha": lcfg.alpha, "start": lcfg.start,
          "stop": lcfg.stop, "targets": list(lcfg.targets)}


def lora_config_from_info(info: dict) -> LoraConfig:
  """The LoraConfig of theta*, from the "lora" entry of a state's info.json."""
  c = info["lora"]
  return LoraConfig(rank=c["rank"], alpha=c["alpha"], start=c["start"],
                    stop=c["stop"], targets=tuple(c["targets"]))


def state_dir(config, workdir) -> pathlib.Path:
  """config.meta.init_from (e.g. a released state) if set, else WORKDIR/meta_state."""
  path = pathlib.Path(config.meta.init_from or pathlib.Path(workdir) / "meta_state")
  if not (path.expanduser() / "info.json").exists():
    raise FileNotFoundError(
        f"no meta-learned state at {path}: run launch.meta_train with this workdir "
        "first, or set config.meta.init_from")
  return path.expanduser()


def load_for(config, workdir, model) -> MetaState:
  """The state `state_dir` names, for this model: a loaders.Model, or a callable
  giving it once the state is read (e.g. Future.result: the weights load on
  another thread meanwhile). Refuses a state meta-learned on other base weights
  or another tokenizer."""
  from regrad_jax import fingerprint  # Hashing only when a model is checked.
  path = state_dir(config, workdir)
  theta, alpha, info = load(path)
  model = model() if callable(model) else model
  check_info(info, path, fingerprint.tree_fingerprint(model.params),
             model.tokenizer.fingerprint())
  return MetaState(theta, alpha, lora_config_from_info(info))
