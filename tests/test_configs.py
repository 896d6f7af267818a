"""Every config file builds; options are strict; the Llama 3 layouts have the released shapes."""
import importlib
import math
import pathlib

import jax
import pytest

from configs import common, llama3
from regrad_jax.model import loaders, transformer

CONFIG_DIR = pathlib.Path(__file__).parents[1] / "configs"
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.py")
                 if p.stem not in ("__init__", "common"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds(name):
  c = importlib.import_module(f"configs.{name}").get_config()
  # The sections every launch reads are there, and the overrides kept their types.
  assert set(c) >= {"model", "lora", "data", "meta", "bank", "retrieval", "adapt", "eval"}
  assert isinstance(c.meta.num_steps, int) and isinstance(c.lora.alpha, float)


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_option_is_an_error_naming_it_and_the_config(name):
  module = importlib.import_module(f"configs.{name}")
  with pytest.raises(ValueError, match=rf"configs/{name}\.py: unknown option 'step'"):
    module.get_config("step=5")


def test_parse_arg_types_and_booleans():
  opts = common.parse_arg("steps=7,fast=False,bf16=1,name=x", "configs/t.py",
                          steps=1, fast=True, bf16=False, name="", lr=0.5)
  assert opts.to_dict() == {"steps": 7, "fast": False, "bf16": True, "name": "x",
                            "lr": 0.5}
  assert common.parse_arg("fast", "t", fast=False).fast is True
  assert common.parse_arg("fast=true", "t", fast=False).fast is True
  assert common.parse_arg("fast=0", "t", fast=True).fast is False
  with pytest.raises(ValueError, match=r"t: option 'fast' is a boolean; got 'yes'"):
    common.parse_arg("fast=yes", "t", fast=False)
  with pytest.raises(ValueError, match=r"t: option 'steps' expects a int, got '2.5'"):
    common.parse_arg("steps=2.5", "t", steps=1)
  with pytest.raises(ValueError, match=r"t: option 'steps' needs a value"):
    common.parse_arg("steps", "t", steps=1)


def test_smollm2_cpkc_options_reach_the_config():
  c = importlib.import_module("configs.smollm2_cpkc").get_config("k=1,ctx=96,mode=icl")
  assert (c.meta.k, c.data.max_context_len, c.meta.mode) == (1, 96, "icl")
  assert max(c.data.doc_buckets) == 96


# Parameter counts of the released checkpoints (Hugging Face model cards).
_NUM_PARAMS = {"1b": 1_235_814_400, "3b": 3_212_749_824, "8b": 8_030_261_248}


@pytest.mark.parametrize("variant", sorted(_NUM_PARAMS))
def test_llama3_variant_param_shapes_without_weights(variant):
  c = llama3.get_config(f"variant={variant},path=/nowhere")
  model = loaders.hf_model_config(llama3.ARCHITECTURES[variant], dtype=c.model.dtype)
  shapes = transformer.param_shapes(model)  # jax.eval_shape: nothing allocated.
  assert all(isinstance(s, jax.ShapeDtypeStruct) for s in jax.tree.leaves(shapes))
  assert sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)) == _NUM_PARAMS[variant]
  start, stop = c.lora.layers
  assert stop == model.n_layers and start == model.n_layers // 2
  if variant == "8b":
    assert shapes["layers"]["q"].shape == (32, 4096, 4096)
    assert shapes["layers"]["k"].shape == (32, 4096, 1024)
    assert shapes["layers"]["down"].shape == (32, 14336, 4096)
    assert shapes["lm_head"].shape == (4096, 128256)


def test_llama3_unknown_variant():
  with pytest.raises(ValueError, match=r"unknown variant '70b'"):
    llama3.get_config("variant=70b")
