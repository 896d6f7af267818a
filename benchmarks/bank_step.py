r"""The bank's jitted per-document gradient step: memory and speed per (pieces, remat).

  python -m benchmarks.bank_step [--config=configs/smollm2_cpkc.py] \
      [--variants=4:none,2:dots] [--batch=8] [--length=128] [--rounds=3]

For each variant "PIECES:REMAT" (bank/compute.py's MICRO_BATCH and REMAT), the step
on `batch` random-token documents of `length` tokens at a PEFT-initialised theta*:
XLA temp memory of the compiled program (memory_analysis) and documents/s, the
variants called in turn for --rounds rounds (fair under a changing load); medians,
and each variant's time as a ratio against the first variant's.
"""
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common
from regrad_jax.bank import codecs, compute
from regrad_jax.model import LoraConfig, init_lora, loaders

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_cpkc.py")
_VARIANTS = flags.DEFINE_list("variants", ["4:none", "2:dots"], "PIECES:REMAT pairs.")
_BATCH = flags.DEFINE_integer("batch", 8, "Documents per step.")
_LENGTH = flags.DEFINE_integer("length", 128, "Tokens per document.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds (each calls every variant).")


def main(argv):
  del argv
  config = _CONFIG.value
  params, model_cfg, _ = loaders.load_model(config.model)
  lcfg = LoraConfig.from_config(config.lora, model_cfg)
  theta = init_lora(jax.random.key(0), model_cfg, lcfg)
  codec = codecs.from_config(config.bank)
  vocab = model_cfg.vocab_size
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, vocab, (_BATCH.value, _LENGTH.value)),
                       jnp.int32)
  mask = jnp.ones(tokens.shape, bool)
  steps, figures = {}, {}
  for spec in _VARIANTS.value:
    pieces, remat = spec.split(":")
    step = jax.jit(functools.partial(compute._doc_gradients, model_config=model_cfg,  # pylint: disable=protected-access
                                     lora_config=lcfg, codec=codec,
                                     micro_batch=int(pieces), remat=remat))
    compiled = step.lower(params, theta, tokens, mask).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**30
    steps[spec], figures[spec] = compiled, {"temp_gb": temp, "times": []}
  for _ in range(_ROUNDS.value):
    for spec, compiled in steps.items():
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(params, theta, tokens, mask))
      figures[spec]["times"].append(time.perf_counter() - t0)
  base = statistics.median(figures[_VARIANTS.value[0]]["times"])
  print(f"bank step, {_BATCH.value} x {_LENGTH.value} tokens, codec {codec.name}:")
  for spec, f in figures.items():
    t = statistics.median(f.pop("times"))
    f.update(step_s=t, docs_per_s=_BATCH.value / t, ratio=t / base)
    print(f"  {spec:>8}: XLA temp {f['temp_gb']:.3f} GB, {t:.2f} s a step "
          f"({f['docs_per_s']:.2f} docs/s), {f['ratio']:.2f}x the first's time")
  common.emit(variants=figures)


if __name__ == "__main__":
  app.run(main)
