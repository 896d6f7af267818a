r"""Every performance figure of the project, each in a fresh process: one report.

  python -m benchmarks.suite [--out=/tmp/regrad_suite]        # 2 CPU cores, SmolLM2
  python -m benchmarks.suite --mode=device                    # one accelerator, < 10 min
  python -m benchmarks.suite --mode=quick                     # tiny model, a smoke test

Each figure runs one benchmark module (benchmarks/*.py, or launch.answer itself) as
its own subprocess, so its peak RSS (os.wait4) is that figure's alone and nothing
compiled by one figure is reused by the next in memory. A module's own --json
figures keep first calls (compilation, or a compilation-cache read) apart from
steady-state medians. Start-up figures run with their own empty caches ("cold")
and then again ("warm"); the meta-step and bank figures run twice, the second
reported, the first's peak RSS and times beside it as cold_* (see PRIMED).
Written: OUT/suite.json and OUT/suite.md.

Figures (full mode): the second-order meta-step K=3 x 128 and K=1 x 64 tokens;
the bank build at batch 8 and one document per call; codec read times; model
load with and without the weights cache; launch.answer for one question, cold
and warm (the median of 3 runs); decoding B=1 / B=16 and serving throughput
(benchmarks.serving). The device mode runs the meta-step, bank build and decoding
in float32 and bfloat16.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_MODE = flags.DEFINE_enum("mode", "cpu", ["cpu", "device", "quick"], "Which sizes.")
_OUT = flags.DEFINE_string("out", "", "Report folder ('' = a new temp folder).")
_ONLY = flags.DEFINE_list("only", [], "Run only these figures (default: all).")
_ANSWER_WORKDIR = flags.DEFINE_string(
    "answer_workdir", "", "A built workdir for the launch.answer figures ('' = build "
    "a small one first, not timed).")
_TIMEOUT = flags.DEFINE_integer("timeout", 1800, "Seconds allowed per figure.")

_SMOL = "configs/smollm2_cpkc.py"
_QUESTION = "Who wrote the novel?"
# Keys each figure's report must hold (the quick test checks them all).
FIELDS = {
    "meta_step": ("step_s", "task_s", "first_step_s", "peak_rss_gb"),
    "bank_build": ("docs", "batch_size", "peak_rss_gb"),
    "bank_codecs": ("fp32_read_k3_ms", "fp32_read_16x_k3_ms", "peak_rss_gb"),
    "load": ("load_s", "peak_rss_gb"),
    "answer_cli": ("wall_s", "peak_rss_gb"),
    "serving": ("generate_s", "generate_b1_s", "first_generate_b1_s",
                "first_generate_b16_s", "batched_qps", "peak_rss_gb"),
}
# Figures whose whole process is the figure (no steady-state median of their
# own) run this many times; the report keeps the median run and every wall time.
REPEATS = {"answer_warm": 3}
# Kinds run once untimed first, so that the reported run reads its programs from
# the persistent compile cache (the steady state of every later run on a machine);
# compiling can raise a process's peak RSS (bank build at batch 8: 1.39 GB cold vs
# 1.21 GB cached; the meta-step 2.01 vs 2.03 GB). The first run's wall time and peak RSS are
# kept as cold_wall_s / cold_peak_rss_gb, its first step as cold_first_step_s.
PRIMED = ("meta_step", "bank_build")


def _answer_workdir_cmds(mode: str, workdir: str) -> list[list[str]]:
  """Commands that build a workdir launch.answer can use (not timed)."""
  if mode == "quick":
    tiny = "--config=configs/tiny.py:steps=2"
    return [[sys.executable, "-m", m, tiny, f"--workdir={workdir}"]
            for m in ("launch.meta_train", "launch.build_bank", "launch.build_index")]
  return [[sys.executable, "-m", "launch.evaluate", *_answer_config(mode),
           "--config.eval.num_questions=8", "--config.eval.methods=('regrad',)",
           "--config.eval.num_probe=4", "--config.eval.num_ppl_docs=2",
           f"--workdir={workdir}"]]


def _answer_config(mode: str) -> list[str]:
  if mode == "quick":
    return ["--config=configs/tiny.py:steps=2"]
  return [f"--config={_SMOL}:k=1,ctx=96",
          "--config.meta.init_from=regrad_jax/released/smollm2_135m_cpkc",
          "--config.adapt.k=1", "--config.eval.split=test"]


def figures(mode: str, answer_workdir: str) -> dict[str, tuple[str, list[str]]]:
  """name -> (kind (a FIELDS key), argv after `python`) for a mode."""
  py = lambda module, *args: [sys.executable, "-m", module, *args]
  answer = py("launch.answer", *_answer_config(mode), f"--workdir={answer_workdir}",
              f"--question={_QUESTION}")
  if mode == "quick":
    tiny = "--config=configs/tiny.py"
    return {
        "meta_step": ("meta_step", py("benchmarks.meta_step", tiny, "--tasks=2",
                                      "--repeats=1", "--nobare")),
        "bank_build_batch": ("bank_build", py(
            "benchmarks.bank_build", tiny, "--docs=8", "--rounds=1",
            "--paths=full_default", "--build_only")),
        "bank_build_one_doc": ("bank_build", py(
            "benchmarks.bank_build", tiny, "--docs=8", "--rounds=1",
            "--paths=bare_per_doc", "--build_only")),
        "bank_codecs": ("bank_codecs", py(
            "benchmarks.bank_build", tiny, "--docs=8", "--questions=2",
            "--notime_builds", "--codecs=int8", "--nof1")),
        "load_cached": ("load", py("benchmarks.startup", tiny)),
        "answer_cold": ("answer_cli", answer),
        "answer_warm": ("answer_cli", answer),
        "serving": ("serving", py(  # theta* from the tiny workdir's meta-training.
            "benchmarks.serving", tiny, f"--config.meta.init_from={answer_workdir}/meta_state",
            "--vectors=0", "--docs=8", "--nosingle")),
    }
  if mode == "device":
    out = {}
    for dtype in ("float32", "bfloat16"):
      d = f"--config.model.dtype={dtype}"
      out.update({
          f"meta_step_k3x128_{dtype}": ("meta_step", py(
              "benchmarks.meta_step", f"--config={_SMOL}:k=3", d, "--tasks=4", "--nobare")),
          f"bank_build_batch8_{dtype}": ("bank_build", py(
              "benchmarks.bank_build", f"--config={_SMOL}", d, "--docs=64", "--rounds=2",
              "--paths=full_default,bare_per_doc", "--build_only")),
          f"serving_{dtype}": ("serving", py(
              "benchmarks.serving", f"--config={_SMOL}:ctx=96", d, "--vectors=0",
              "--nosingle")),
      })
    return out
  return {
      "meta_step_k3x128": ("meta_step", py(
          "benchmarks.meta_step", f"--config={_SMOL}:k=3", "--tasks=2", "--nobare")),
      "meta_step_k3x128_remat": ("meta_step", py(
          "benchmarks.meta_step", f"--config={_SMOL}:k=3", "--config.meta.remat=True",
          "--tasks=2", "--nobare")),
      "meta_step_k1x64": ("meta_step", py(
          "benchmarks.meta_step", f"--config={_SMOL}:k=1,ctx=64", "--tasks=2",
          "--nobare")),
      "bank_build_batch8": ("bank_build", py(
          "benchmarks.bank_build", f"--config={_SMOL}", "--docs=32", "--rounds=2",
          "--paths=full_default", "--build_only")),
      "bank_build_one_doc": ("bank_build", py(
          "benchmarks.bank_build", f"--config={_SMOL}", "--docs=16", "--rounds=2",
          "--paths=bare_per_doc", "--build_only")),
      "bank_codecs": ("bank_codecs", py(
          "benchmarks.bank_build", f"--config={_SMOL}", "--docs=32", "--questions=4",
          "--notime_builds", "--codecs=bf16,int8,qzstd:0.4", "--nof1")),
      "load_cached": ("load", py("benchmarks.startup", f"--config={_SMOL}")),
      "load_fresh": ("load", py("benchmarks.startup", f"--config={_SMOL}", "--nocache")),
      "answer_cold": ("answer_cli", answer),
      "answer_warm": ("answer_cli", answer),
      "serving": ("serving", py("benchmarks.serving", f"--config={_SMOL}:ctx=96",
                                "--vectors=0")),
  }


def run_one(argv: list[str], env: dict, json_path: pathlib.Path | None,
            timeout: int) -> dict:
  """Runs argv; returns its --json figures plus wall_s, peak_rss_gb (the child's)."""
  if json_path is not None:
    argv = [*argv, f"--json={json_path}"]
  t0 = time.perf_counter()
  proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = t0 + timeout
  while True:  # wait4 gives this child's own rusage (peak RSS).
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid:
      break
    if time.perf_counter() > deadline:
      proc.kill()
      pid, status, usage = os.wait4(proc.pid, 0)
      break
    time.sleep(0.05)
  wall = time.perf_counter() - t0
  proc.returncode = os.waitstatus_to_exitcode(status)
  log = proc.stdout.read().decode(errors="replace")
  if proc.returncode != 0:
    raise RuntimeError(f"`{' '.join(argv)}` failed ({proc.returncode}):\n{log[-3000:]}")
  out = json.loads(json_path.read_text()) if json_path is not None else {}
  out.update(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime,
             peak_rss_gb=usage.ru_maxrss / 2**20)  # The child's own maximum.
  out["log_tail"] = log[-600:]
  return out


def markdown(report: dict) -> str:
  lines = [f"# benchmarks.suite ({report['mode']}), {report['date']}", "",
           f"{report['machine']}", "",
           "| figure | wall s | CPU s | peak RSS GB | figures |", "|---|---|---|---|---|"]
  for name, r in report["figures"].items():
    rest = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in sorted(r.items())
                     if k not in ("wall_s", "cpu_s", "peak_rss_gb", "log_tail"))
    lines.append(f"| {name} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                 f"{r['peak_rss_gb']:.2f} | {rest} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  mode = _MODE.value
  out = pathlib.Path(_OUT.value or tempfile.mkdtemp(prefix="regrad_suite_"))
  out.mkdir(parents=True, exist_ok=True)
  scratch = pathlib.Path(tempfile.mkdtemp(prefix="suite_scratch_", dir=out))
  env = dict(os.environ)
  workdir = _ANSWER_WORKDIR.value
  todo = figures(mode, workdir or str(scratch / "answer_workdir"))
  if _ONLY.value:
    unknown = sorted(set(_ONLY.value) - set(todo))
    if unknown:
      raise ValueError(f"--only names unknown figures {unknown}; known: {sorted(todo)}")
    todo = {k: v for k, v in todo.items() if k in _ONLY.value}
  needs_workdir = {"answer_cli", "serving"} if mode == "quick" else {"answer_cli"}
  if any(kind in needs_workdir for kind, _ in todo.values()) and not workdir:
    for cmd in _answer_workdir_cmds(mode, str(scratch / "answer_workdir")):
      run_one(cmd, env, None, _TIMEOUT.value)
  # The start-up figures get caches of their own: the answer CLI's start empty
  # (answer_cold) and are reused by answer_warm; load_cached reads an entry that an
  # untimed load wrote first.
  envs = {"answer_cli": {**env, "REGRAD_XLA_CACHE": str(scratch / "answer_xla"),
                         "REGRAD_WEIGHTS_CACHE": str(scratch / "answer_weights")},
          "load": {**env, "REGRAD_WEIGHTS_CACHE": str(scratch / "load_weights")}}
  report = {"mode": mode, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "machine": f"{os.cpu_count()} CPUs, load average "
                       f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at start",
            "figures": {}}
  for name, (kind, cmd) in todo.items():
    print(f"[suite] {name}: {' '.join(cmd[2:])}", flush=True)
    figure_env = envs.get(kind, env)
    cold = None
    if kind in PRIMED or (kind == "load" and "--nocache" not in cmd):
      cold = run_one(cmd, figure_env, scratch / "prime.json", _TIMEOUT.value)
    runs = [run_one(cmd, figure_env,
                    None if kind == "answer_cli" else scratch / f"{name}.json",
                    _TIMEOUT.value) for _ in range(REPEATS.get(name, 1))]
    r = sorted(runs, key=lambda x: x["wall_s"])[len(runs) // 2]  # The median run.
    if len(runs) > 1:
      r["runs_wall_s"] = [round(x["wall_s"], 2) for x in runs]
    if kind in PRIMED:
      r.update({f"cold_{k}": cold[k] for k in ("wall_s", "peak_rss_gb", "first_step_s")
                if k in cold})
    missing = [f for f in FIELDS[kind] if f not in r]
    if missing:
      raise RuntimeError(f"figure {name} lacks {missing}")
    report["figures"][name] = {"kind": kind, **r}
    print(f"[suite]   wall {r['wall_s']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GB",
          flush=True)
    (out / "suite.json").write_text(json.dumps(report, indent=2, sort_keys=True))
  (out / "suite.md").write_text(markdown(report))
  shutil.rmtree(scratch, ignore_errors=True)
  print(markdown(report))
  print(f"written {out / 'suite.json'} and {out / 'suite.md'}")


if __name__ == "__main__":
  app.run(main)
