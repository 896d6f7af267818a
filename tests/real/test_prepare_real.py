"""Real data preparation: squad rebuilt from the cached BIG-bench sdist.

Uses the sdist only if it is already in the download cache
($REGRAD_CACHE/downloads, which `python -m launch.prepare_data` fills) and never
downloads it (358 MB); tests/test_data.py::test_prepare_reproduces_shared_data
runs the whole, downloading preparation. About 20 s: one pass over the archive.
"""
import hashlib
import re

import pytest

from regrad_jax.data import prepare

pytestmark = pytest.mark.real


def test_pinned_checksums_are_the_data_readme_table(shared_data_dir):
  readme = (shared_data_dir / "README.md").read_text(encoding="utf-8")
  table = dict(re.findall(r"^\| `([^`]+)` \|[^|]*\|[^|]*\| `([0-9a-f]{64})` \|$", readme, re.M))
  assert table == prepare.EXPECTED_SHA256


def test_squad_rebuilt_byte_identically(shared_data_dir):
  """squad/{train,dev}.jsonl from the sdist through the id lists equal ../shared/data's."""
  sdist = prepare.registry.cache_root() / "downloads" / prepare.BIGBENCH.filename
  if not sdist.is_file():
    pytest.skip(f"{sdist} not downloaded (python -m launch.prepare_data fetches it)")
  prepare.check_sha256_file(sdist, prepare.BIGBENCH.sha256)
  files = prepare.bigbench_files(sdist)
  paragraphs = {}
  for split, n, n_paragraphs in (("train", 4_495, 879), ("dev", 789, 147)):
    rel = f"squad/{split}.jsonl"
    blob = prepare.jsonl_bytes(files[rel])
    assert hashlib.sha256(blob).hexdigest() == prepare.EXPECTED_SHA256[rel]
    assert blob == (shared_data_dir / rel).read_bytes()
    rows = files[rel]
    assert len(rows) == n and all(r["answer"] in r["passage"] for r in rows)
    # The data README's paragraph count: passages with whitespace removed.
    paragraphs[split] = {re.sub(r"\s+", "", r["passage"]) for r in rows}
    assert len(paragraphs[split]) == n_paragraphs
  assert not paragraphs["train"] & paragraphs["dev"]
