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


@pytest.fixture
def shared_data_dir():
  path = shared_data()
  if path is None:
    pytest.skip("../shared/data not present")
  return path
