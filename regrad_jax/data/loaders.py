"""The data a config names, loaded: QA splits, bank documents, general text, the probe.

The rest of the package reads data only through these functions (re-exported by
regrad_jax.data), driven by the config's `data` section:

  docs, records = load_split(config, "train")  # QA records + their passages
  corpus = load_corpus(config, "test")         # the bank: passages + distractors
  text = load_general_text(config, 50)         # perplexity (drift)
  probe = load_probe(config, 500)              # closed-book facts (forgetting)

`config.data.name` picks the dataset: "tiny" (generated in code, see tiny.py),
"cpkc" or "squad" (our JSONL files), or a public format a user brings ("popqa",
"2wiki", "hotpotqa", "cwq"; config.data.train/dev/test then name those files).
A mixture joins names with "+" ("cpkc+squad"): each split is the union of the
datasets' standard files (FILES), every record tagged with its `domain`, and
meta-training samples the domains by config.data.weights.
Real files are found under `resolve_root(config)`.
"""
import dataclasses
import os
import pathlib

from absl import logging

from regrad_jax.data import prepare as prepare_lib
from regrad_jax.data import records as records_lib
from regrad_jax.data import tiny
from regrad_jax.data.records import Document, QARecord

SPLITS = ("train", "dev", "test")
READERS = {
    "cpkc": records_lib.read_cpkc,
    "popqa": records_lib.read_popqa,
    "2wiki": records_lib.read_2wiki,
    "hotpotqa": records_lib.read_hotpotqa,
    "cwq": records_lib.read_cwq,
    "squad": records_lib.read_squad,
}
# Each of our datasets' files under the data root ("" in config.data.<split>
# means this file); squad has no test split (its dev questions are reported).
FILES = {
    "cpkc": {s: f"cpkc/{s}.jsonl" for s in SPLITS},
    "squad": {s: f"squad/{s}.jsonl" for s in ("train", "dev")},
}
# The developers' shared data folder: a sibling of the repository.
_SIBLING = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"


def resolve_root(config) -> pathlib.Path:
  """The folder holding cpkc/, wiki_summaries.jsonl, ... (first match wins).

  1. config.data.root, if set; 2. $REGRAD_DATA; 3. the cache
  ($REGRAD_CACHE/data, default ~/.cache/regrad_jax/data) if `prepare` completed
  there; 4. ../shared/data next to the repository (developer machines);
  5. otherwise run `prepare` into the cache (downloads about 400 MB once).
  """
  for origin, value in (("config.data.root", config.data.root),
                        ("$REGRAD_DATA", os.environ.get("REGRAD_DATA", ""))):
    if value:
      root = pathlib.Path(value).expanduser()
      if not root.is_dir():
        raise FileNotFoundError(f"Data folder {root} (from {origin}) does not exist.")
      return root
  cache = prepare_lib.default_data_dir()
  if prepare_lib.is_prepared(cache):
    return cache
  if _SIBLING.is_dir():
    return _SIBLING
  logging.info("No data folder found: preparing the data into %s.", cache)
  return prepare_lib.prepare(cache)


def domains(config) -> tuple[str, ...]:
  """The datasets of config.data.name: ("cpkc",) or, for "cpkc+squad", both."""
  return tuple(config.data.name.split("+"))


def domain_weights(config) -> tuple[float, ...] | None:
  """config.data.weights normalised (one per domain); None = by record count."""
  names, w = domains(config), tuple(float(x) for x in config.data.weights)
  if not w:
    return None
  if len(w) != len(names) or min(w) < 0 or sum(w) <= 0:
    raise ValueError(f"config.data.weights={w} needs one non-negative weight per "
                     f"dataset of config.data.name={config.data.name!r}.")
  return tuple(x / sum(w) for x in w)


def load_split(config, split: str) -> tuple[list[Document], list[QARecord]]:
  """(documents, records) of split "train", "dev" or "test" of config.data.name.

  Records carry `domain` = their dataset's name; a mixture concatenates its
  datasets in the order named (document ids must not collide: checked).
  """
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
  names = domains(config)
  if config.data.name == "tiny":
    docs, records = tiny.tiny_splits()[split]
    return docs, [dataclasses.replace(r, domain="tiny") for r in records]
  unknown = [n for n in names if n not in READERS]
  if unknown:
    raise ValueError(f"Unknown dataset {unknown[0]!r} in config.data.name="
                     f"{config.data.name!r}; known: {['tiny', *READERS]}.")
  docs, records = [], []
  for name in names:
    rel = config.data[split] if len(names) == 1 else ""
    if len(names) > 1 and config.data[split]:
      raise ValueError(f"config.data.{split}={config.data[split]!r} is ambiguous for "
                       f"the mixture {config.data.name!r}: leave it empty.")
    if not rel:
      if split not in FILES.get(name, {}):
        raise ValueError(f"Dataset {name!r} has no standard {split} file; set "
                         f"config.data.{split} (or use another split).")
      rel = FILES[name][split]
    d, r = READERS[name](_data_path(config, rel))
    docs += d
    records += [dataclasses.replace(x, domain=name) for x in r]
  _check_unique(docs, f"{config.data.name} {split}")
  return docs, records


def load_corpus(config, split: str = "test") -> list[Document]:
  """The documents of a bank: `split`'s passages, then the distractors.

  Distractors are the first config.data.num_distractors documents of
  config.data.distractors (Wikipedia summaries; 0 = none, -1 = all; for the tiny
  dataset, invented documents on other entities). Ids are unique (checked).
  """
  docs = list(load_split(config, split)[0])
  n = config.data.num_distractors
  if n < -1:
    raise ValueError(f"config.data.num_distractors must be >= -1, got {n}.")
  if n != 0 and config.data.name == "tiny":
    docs += tiny.tiny_distractors(n)
  elif n != 0 and config.data.distractors:
    extra = records_lib.read_wiki_summaries(_data_path(config, config.data.distractors),
                                            limit=None if n == -1 else n)
    if n != -1 and len(extra) < n:
      raise ValueError(f"config.data.num_distractors={n}, but "
                       f"{config.data.distractors} holds only {len(extra)} documents.")
    docs += extra
  _check_unique(docs, f"{split} corpus")
  return docs


def _check_unique(docs: list[Document], what: str) -> None:
  seen = set()
  for d in docs:
    if d.id in seen:
      raise ValueError(f"Duplicate document id {d.id!r} in the {what}.")
    seen.add(d.id)


def load_general_text(config, n: int) -> list[Document]:
  """`n` general-text documents for perplexity (-1 = all).

  Real data: an even spread over Moby-Dick chunks (half) and State of the Union
  chunks (half), interleaved; if general_text/ was not prepared (no npm), the
  last `n` Wikipedia summaries instead (the bank's distractors come from the
  front of that file).
  """
  if config.data.name == "tiny":
    return tiny.tiny_general_text(tiny.NUM_ALL if n == -1 else n)
  root = resolve_root(config)
  if not (root / "general_text").is_dir():
    logging.warning("%s has no general_text/: using Wikipedia summaries for perplexity.",
                    root)
    summaries = records_lib.read_wiki_summaries(root / "wiki_summaries.jsonl")
    return summaries[len(summaries) - _check_n(n, len(summaries), "summaries"):]
  docs = records_lib.read_general_text(root)
  moby = [d for d in docs if d.id.startswith("moby-dick-")]
  sotu = [d for d in docs if not d.id.startswith("moby-dick-")]
  if n == -1:
    return docs
  _check_n(n, len(docs), "general-text chunks")
  k = min(n - n // 2, len(moby))  # Half from each source, as far as each reaches.
  k = max(k, n - len(sotu))
  picks_moby, picks_sotu = _spread(moby, k), _spread(sotu, n - k)
  out = []
  for i in range(max(len(picks_moby), len(picks_sotu))):
    out += picks_moby[i:i + 1] + picks_sotu[i:i + 1]
  return out


def load_probe(config, n: int) -> list[QARecord]:
  """`n` closed-book cloze prompts (-1 = all): an even spread over the probe file."""
  if config.data.name == "tiny":
    return tiny.tiny_probe(tiny.NUM_ALL if n == -1 else n)
  probe = records_lib.read_probe(resolve_root(config) / "wikidata_probe.jsonl")
  return probe if n == -1 else _spread(probe, _check_n(n, len(probe), "probe prompts"))


def _data_path(config, rel: str) -> pathlib.Path:
  """`rel` if absolute, else under `resolve_root(config)` (resolved only if needed)."""
  path = pathlib.Path(rel).expanduser()
  return path if path.is_absolute() else resolve_root(config) / path


def _check_n(n: int, available: int, what: str) -> int:
  if not 0 <= n <= available:
    raise ValueError(f"Asked for {n} {what}; {available} available (-1 = all).")
  return n


def _spread(items: list, n: int) -> list:
  """`n` items evenly spaced over `items` (deterministic, keeps order)."""
  return [items[i * len(items) // n] for i in range(n)] if n else []

