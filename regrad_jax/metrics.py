"""QA metrics: exact match, token F1 and answer accuracy, SQuAD-normalised.

The one metrics module of the package, at the top level so that every stage
(meta-training's dev evaluation, eval/, baselines, benchmarks) imports it without
importing the evaluation drivers. Normalisation follows the official
SQuAD evaluation script (also used by the ReGrad reference): lower-case, drop
ASCII punctuation, drop the articles a/an/the, collapse whitespace. A
prediction is scored against every gold answer and the best score counts.

Answer accuracy (`contains_answer`, "acc" in results) asks whether the
prediction *contains* a gold answer: a sentence-long answer that names the
right entity counts, where token F1 would punish its extra words. It separates
knowing the answer from having learned the short answer format.

Per-example functions return fractions in [0, 1]; `accuracy` and `aggregate`
report percentages, as papers do.
"""
import collections
import re
import string
from typing import Sequence

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
  """SQuAD normalisation: lower, no punctuation, no articles, single spaces."""
  text = "".join(c for c in text.lower() if c not in _PUNCT)
  return " ".join(_ARTICLES.sub(" ", text).split())


def _golds(golds: str | Sequence[str]) -> list[str]:
  golds = [golds] if isinstance(golds, str) else list(golds)
  if not golds:
    raise ValueError("No gold answers to compare against.")
  if not all(isinstance(g, str) for g in golds):
    raise TypeError(f"Gold answers must be strings, got {golds!r}.")
  return golds


def exact_match(pred: str, golds: str | Sequence[str]) -> float:
  """1.0 if the normalised prediction equals any normalised gold, else 0.0."""
  p = normalize(pred)
  return float(any(p == normalize(g) for g in _golds(golds)))


def _token_f1(pred: str, gold: str) -> float:
  p, g = normalize(pred).split(), normalize(gold).split()
  if not p or not g:  # SQuAD v2 rule: two empty answers agree, one empty does not.
    return float(p == g)
  common = sum((collections.Counter(p) & collections.Counter(g)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(p), common / len(g)
  return 2 * precision * recall / (precision + recall)


def f1(pred: str, golds: str | Sequence[str]) -> float:
  """Token F1 (bag of normalised tokens), the max over the gold answers."""
  return max(_token_f1(pred, g) for g in _golds(golds))


def _contains_tokens(pred: str, gold: str) -> bool:
  p, g = normalize(pred).split(), normalize(gold).split()
  if not g:  # An empty gold is contained only in an empty prediction (as in EM).
    return not p
  return any(p[i:i + len(g)] == g for i in range(len(p) - len(g) + 1))


def contains_answer(pred: str, golds: str | Sequence[str]) -> float:
  """1.0 if some normalised gold occurs in the normalised prediction as a run
  of whole tokens ("in Paris, France" contains "paris"; "Parisian" does not)."""
  return float(any(_contains_tokens(pred, g) for g in _golds(golds)))


def _check_lengths(preds: Sequence, golds: Sequence) -> None:
  if len(preds) != len(golds):
    raise ValueError(f"{len(preds)} predictions but {len(golds)} gold entries.")
  if not preds:
    raise ValueError("No predictions to score.")


def accuracy(preds: Sequence[str], golds: Sequence[str | Sequence[str]]) -> float:
  """Closed-set accuracy in percent: normalised exact match per item, averaged.

  golds[i] is the label of item i (or several acceptable labels).
  """
  _check_lengths(preds, golds)
  return 100.0 * sum(exact_match(p, g) for p, g in zip(preds, golds)) / len(preds)


def aggregate(preds: Sequence[str], gold_lists: Sequence[str | Sequence[str]]) -> dict:
  """Mean EM, F1 and answer accuracy over a set of predictions, in percent.

  Returns:
    {"em": float, "f1": float, "acc": float, "n": int}.
  """
  _check_lengths(preds, gold_lists)
  n = len(preds)

  def mean(score):
    return 100.0 * sum(score(p, g) for p, g in zip(preds, gold_lists)) / n

  return {"em": mean(exact_match), "f1": mean(f1), "acc": mean(contains_answer),
          "n": n}
