"""Evaluation: QA metrics (metrics.py) and the evaluation drivers of the package."""
from regrad_jax.eval.metrics import (accuracy, aggregate, contains_answer, exact_match,
                                     f1, normalize)

__all__ = ["accuracy", "aggregate", "contains_answer", "exact_match", "f1",
           "normalize"]
