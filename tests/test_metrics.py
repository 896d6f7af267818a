"""Tests for regrad_jax.metrics against hand-computed values."""
import pytest

from regrad_jax import metrics


@pytest.mark.parametrize("text, expected", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an   apple,  a pear ", "apple pear"),
    ("Theory of the atom", "theory of atom"),  # "the" only as a whole word.
    ("U.S.A.", "usa"),
    ("", ""),
])
def test_normalize(text, expected):
  assert metrics.normalize(text) == expected


def test_exact_match():
  assert metrics.exact_match("the Paris.", "paris") == 1.0
  assert metrics.exact_match("Paris, France", "Paris") == 0.0
  assert metrics.exact_match("Lyon", ["Paris", "lyon"]) == 1.0  # Any gold counts.
  assert metrics.exact_match("", [""]) == 1.0
  assert metrics.exact_match("", ["Paris"]) == 0.0


def test_f1_hand_computed():
  # pred tokens {barack, obama}, gold {obama}: P=1/2, R=1, F1=2/3.
  assert metrics.f1("Barack Obama", "Obama") == pytest.approx(2 / 3)
  # pred {new, york, city}, gold {new, york}: P=2/3, R=1, F1=0.8.
  assert metrics.f1("New York City", "new york") == pytest.approx(0.8)
  # Tokens count with multiplicity: pred [x, x], gold [x]: P=1/2, R=1, F1=2/3.
  assert metrics.f1("x x", "x") == pytest.approx(2 / 3)
  assert metrics.f1("Paris", "London") == 0.0
  # Max over golds: 0 vs 2/3 vs 1.
  assert metrics.f1("Barack Obama", ["Bush", "Obama", "barack obama"]) == 1.0
  assert metrics.f1("Barack Obama", ["Bush", "Obama"]) == pytest.approx(2 / 3)


def test_f1_empty_strings():
  assert metrics.f1("", "") == 1.0
  assert metrics.f1("", "Paris") == 0.0
  assert metrics.f1("Paris", "") == 0.0
  assert metrics.f1("the", "a") == 1.0  # Both normalise to empty.


def test_bad_golds():
  with pytest.raises(ValueError, match="No gold"):
    metrics.f1("x", [])
  with pytest.raises(TypeError, match="strings"):
    metrics.exact_match("x", [None])


def test_contains_answer():
  assert metrics.contains_answer("It was in Paris, France.", "paris") == 1.0
  assert metrics.contains_answer("The answer is New York City", "new york") == 1.0
  assert metrics.contains_answer("Parisian cafes", "Paris") == 0.0  # Whole tokens only.
  assert metrics.contains_answer("York, New", "new york") == 0.0  # In order, contiguous.
  assert metrics.contains_answer("Lyon", "the Lyon") == 1.0  # Articles normalised away.
  assert metrics.contains_answer("Lyon or Nice", ["Paris", "nice"]) == 1.0  # Any gold.
  assert metrics.contains_answer("x", "paris") == 0.0
  assert metrics.contains_answer("", "") == 1.0  # Empty gold: only an empty answer.
  assert metrics.contains_answer("Paris", "the") == 0.0
  assert metrics.contains_answer("", "Paris") == 0.0


def test_accuracy():
  assert metrics.accuracy(["yes", "No.", "maybe"], ["Yes", "no", "no"]) == pytest.approx(200 / 3)
  assert metrics.accuracy(["B"], [["a", "b"]]) == 100.0
  with pytest.raises(ValueError, match="2 predictions but 1"):
    metrics.accuracy(["a", "b"], ["a"])


def test_aggregate():
  out = metrics.aggregate(["Barack Obama", "Paris", ""], [["Obama"], ["paris", "Lyon"], ["x"]])
  assert set(out) == {"em", "f1", "acc", "n"} and out["n"] == 3
  assert out["acc"] == pytest.approx(200 / 3)  # "Barack Obama" contains "Obama".
  assert out["em"] == pytest.approx(100 / 3)  # Only "Paris" matches exactly.
  assert out["f1"] == pytest.approx(100 * (2 / 3 + 1 + 0) / 3)
  with pytest.raises(ValueError, match="No predictions"):
    metrics.aggregate([], [])
