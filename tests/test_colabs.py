"""The colabs/ notebooks run top to bottom, headless, on the tiny config.

Each notebook runs in a fresh python3 kernel of this interpreter (jupyter_client
starts "python" kernels with sys.executable, so the venv's ipykernel and package),
with REGRAD_NOTEBOOK_CONFIG=tiny, its own output folder, one CPU device, and the
test suite's persistent compilation cache: the notebooks compile the same tiny
meta-step and bank programs, so the second and third reuse the first's. A cell
that raises fails the test with the cell and the traceback.
"""
import json
import re

import jax
import pytest

from tests.conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = ("quickstart", "gradient_bank", "meta_learning")
CELL_TIMEOUT_S = 300  # Per cell. All three: ~40 s of CPU with a warm cache, ~2 min cold.


@pytest.fixture
def kernel_env(monkeypatch, tmp_path):
  """The kernel inherits this process's environment."""
  monkeypatch.setenv("REGRAD_NOTEBOOK_CONFIG", "tiny")
  monkeypatch.setenv("REGRAD_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # One device, as on a laptop.
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  cache = jax.config.jax_compilation_cache_dir
  if cache:
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", cache)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  return tmp_path / "work"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, kernel_env):
  path = REPO / "colabs" / f"{name}.ipynb"
  nb = nbformat.read(path, as_version=4)
  # Saved without outputs, so that diffs show code, not images.
  assert all(not c.get("outputs") and c.get("execution_count") is None
             for c in nb.cells if c.cell_type == "code"), f"{path} holds outputs"
  # A story: markdown between the code cells.
  kinds = [c.cell_type for c in nb.cells]
  assert kinds[0] == "markdown" and kinds.count("markdown") >= kinds.count("code") - 1

  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
      resources={"metadata": {"path": str(REPO / "colabs")}})
  client.execute()  # Raises CellExecutionError naming the failing cell.

  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors, errors
  assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
  # The notebook wrote under its own REGRAD_NOTEBOOK_WORKDIR.
  assert (kernel_env / "tiny" / name).is_dir()
  shown = "".join(o.get("text", "") + json.dumps(o.get("data", {}))
                  for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  if name == "quickstart":  # The comparison table shows all three methods.
    assert all(m in shown for m in ("closed-book", "RAG", "ReGrad")), shown[-2000:]
  if name == "gradient_bank":  # TensorStore alone reads what the Bank class reads.
    assert "TensorStore row == Bank row: True" in shown, shown[-2000:]
  if name == "meta_learning":  # The live run trained: the meta-loss fell.
    first, last = map(float, re.search(r"first loss ([\d.]+), last ([\d.]+)",
                                       shown).groups())
    assert last < first
