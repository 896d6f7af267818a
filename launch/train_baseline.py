r"""Trains a fine-tuned baseline's LoRA (rag_ft or direct_ft) into WORKDIR/<method>.

The meta-state's training tasks and budget (config.eval.ft_steps x ft_batch_size,
0 = meta.num_steps x meta.batch_size), e.g. for the released SmolLM2 cpkc state:
  python -m launch.train_baseline --config=configs/smollm2_cpkc.py:steps=600,k=1,ctx=96 \
      --method=rag_ft --workdir=/tmp/ft_smollm2
then evaluate with --config.eval.rag_ft_from=/tmp/ft_smollm2/rag_ft.
"""
import pathlib

from absl import app, flags
from ml_collections import config_flags

from regrad_jax.baselines import finetuned
from regrad_jax.model import loaders

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_METHOD = flags.DEFINE_enum("method", "rag_ft", list(finetuned.MODES), "Which adapter.")


def main(argv):
  del argv
  model = loaders.load_model(_CONFIG.value.model)
  path = pathlib.Path(_WORKDIR.value) / _METHOD.value
  info = finetuned.train_and_save(_CONFIG.value, path, model, _METHOD.value)
  print(f"{_METHOD.value}: {info['tasks']} tasks, answer loss {info['loss_first']:.3f} "
        f"-> {info['loss_last_10']:.3f} (last 10 steps), {info['seconds']:.0f} s; {path}")


if __name__ == "__main__":
  app.run(main)
