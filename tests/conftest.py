"""Test set-up: 4 fake CPU devices, set before JAX is first imported."""
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_data() -> pathlib.Path | None:
  """../shared/data (or $REGRAD_SHARED_DATA) when present: real-suite data."""
  path = pathlib.Path(os.environ.get("REGRAD_SHARED_DATA", REPO.parent / "shared" / "data"))
  return path if path.exists() else None


@pytest.fixture(scope="session")
def shared_data_dir():
  path = shared_data()
  if path is None:
    pytest.skip("../shared/data not present")
  return path


# Identical programs compiled by different tests (or by a test and the library
# call it makes) are read from a persistent cache instead of compiled again.
import jax  # noqa: E402

_TEST_JAX_CACHE = os.environ.get("REGRAD_TEST_JAX_CACHE", "/tmp/regrad_jax_test_cache")
jax.config.update("jax_compilation_cache_dir", _TEST_JAX_CACHE)
os.environ.setdefault("REGRAD_XLA_CACHE", _TEST_JAX_CACHE)  # Worker subprocesses too.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# Dequantised GGUFs (model/weights_cache.py) likewise, outside the user's cache.
os.environ.setdefault("REGRAD_WEIGHTS_CACHE", "/tmp/regrad_jax_test_weights")
