"""Evaluation: every method on the same model, documents and questions.

  evaluate.py    the driver (`launch.evaluate`): QA of each method, then drift
  injection.py   QA and drift as documents keep arriving
  drift.py       how far a method's generic model moved from the base model
  report.py      results as Markdown tables and a plot

The QA scores themselves (EM, F1, acc) are regrad_jax/metrics.py, which
meta-training's dev evaluation uses too.
"""
