"""Results as Markdown tables and a matplotlib plot (no state; pure formatting).

  results_table(results)        one row per method: EM, F1, acc, n, drift figures
  injection_table(curve)        one row per (documents injected, method)
  plot_injection(curve, path)   F1 and drift against documents injected (PNG)

`results` is results.json's "methods" mapping (method -> figures); `curve` is
injection.json's (see eval/injection.py).
"""
import math
import pathlib

COLUMNS = (("em", "EM", "{:.1f}"), ("f1", "F1", "{:.1f}"), ("acc", "acc", "{:.1f}"),
           ("n", "n", "{:d}"),
           ("ppl_general", "PPL general", "{:.2f}"), ("ppl_wiki", "PPL wiki", "{:.2f}"),
           ("probe_acc", "probe acc", "{:.1f}"), ("weight_l2", "weight L2", "{:.4g}"))
TITLES = {"direct": "Direct", "direct_ft": "Direct (fine-tuned)", "rag": "RAG",
          "rag_ft": "RAG (fine-tuned)", "cpt": "CPT (full)", "cpt_lora": "CPT (LoRA)",
          "icpt": "Instruction CPT (full)", "icpt_lora": "Instruction CPT (LoRA)",
          "prag": "PRAG", "regrad": "ReGrad", "regrad_icl": "ReGrad + ICL (blind-trained state)"}


def _cell(value, fmt: str) -> str:
  if value is None:
    return "-"
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return fmt.format(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def results_table(methods: dict) -> str:
  """Markdown: one row per method (method -> {em, f1, acc, n, ppl_*, probe_acc, ...}).

  acc: the answer contains a gold answer (regrad_jax/metrics.contains_answer).
  """
  if not methods:
    raise ValueError("results_table: no methods")
  rows = [[TITLES.get(name, name)] + [_cell(fig.get(key), fmt) for key, _, fmt in COLUMNS]
          for name, fig in methods.items()]
  return _table(["method"] + [title for _, title, _ in COLUMNS], rows)


def injection_table(curve: dict) -> str:
  """Markdown: one row per (increment, method) of an injection curve.

  curve: {"docs": [n_1, ...], "methods": {name: [figures at n_1, ...]}}.
  """
  rows = []
  for i, n in enumerate(curve["docs"]):
    for name, points in curve["methods"].items():
      rows.append([str(n), TITLES.get(name, name)] +
                  [_cell(points[i].get(key), fmt) for key, _, fmt in COLUMNS])
  return _table(["docs injected", "method"] + [title for _, title, _ in COLUMNS], rows)


PLOTTED = (("f1", "QA F1 (%)"), ("ppl_general", "perplexity, general text"),
           ("probe_acc", "closed-book probe accuracy (%)"),
           ("weight_l2", "L2 distance from base weights"))


def plot_injection(curve: dict, path) -> pathlib.Path:
  """Writes a 2x2 PNG: F1 and three drift figures against documents injected."""
  import matplotlib
  matplotlib.use("Agg")  # Files only; never a display.
  import matplotlib.pyplot as plt

  path = pathlib.Path(path)
  fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), constrained_layout=True)
  styles = [(m, ls) for ls in ("-", "--", ":") for m in "osv^Dx*"]
  for ax, (key, label) in zip(axes.ravel(), PLOTTED):
    for (name, points), (marker, ls) in zip(curve["methods"].items(), styles):
      # Methods with equal figures (e.g. zero drift) overlap: markers tell them apart.
      ax.plot(curve["docs"], [p.get(key, float("nan")) for p in points],
              marker=marker, linestyle=ls, alpha=0.85, label=TITLES.get(name, name))
    ax.set_xticks(curve["docs"])
    ax.set_xlabel("documents injected")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0, 0].legend()
  fig.suptitle("Sequential injection")
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
