r"""Prints the model's greedy continuation of a prompt (a smoke test of a config).

  python -m launch.generate --config=configs/smollm2_135m.py \
      --prompt="The capital of France is"
  python -m launch.generate --config=configs/smollm2_135m.py --chat \
      --prompt="What is the capital of France?"
"""
from absl import app, flags
from ml_collections import config_flags

from regrad_jax.model import generation, loaders

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_135m.py")
_PROMPT = flags.DEFINE_string("prompt", "The capital of France is", "Text to continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 20, "Tokens to generate.")
_CHAT = flags.DEFINE_bool("chat", False, "Treat --prompt as a question (QA prompt).")


def main(argv):
  del argv
  config = _CONFIG.value
  params, model_cfg, tokenizer = loaders.load_model(config.model)
  text, = generation.answer(params, model_cfg, tokenizer, [_PROMPT.value],
                          _MAX_NEW.value, chat=_CHAT.value)
  print(text)


if __name__ == "__main__":
  app.run(main)
