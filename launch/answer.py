r"""Answers questions with ReGrad over WORKDIR/{meta_state,bank,index}.

  python -m launch.answer --config=configs/tiny.py --workdir=/tmp/regrad_tiny \
      --question="What is the capital of Velmora?"
"""
from absl import app, flags
from ml_collections import config_flags

from regrad_jax.adapt import ReGrad

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory with meta_state, bank, index.",
                               required=True)
_QUESTIONS = flags.DEFINE_multi_string("question", None, "Question(s).", required=True)
_MODE = flags.DEFINE_enum("mode", "blind", ["blind", "icl"], "ReGrad or ReGrad+ICL.")


def main(argv):
  del argv
  engine = ReGrad.load(_WORKDIR.value, _CONFIG.value)
  for r in engine.answer(_QUESTIONS.value, mode=_MODE.value):
    docs = ", ".join(f"{i} ({s:.3f})" for i, s in zip(r.doc_ids, r.scores))
    print(f"Q: {r.question}\nA: {r.answer}\n   retrieved: {docs}")


if __name__ == "__main__":
  app.run(main)
