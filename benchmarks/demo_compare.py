"""Charts that compare demo runs (`benchmarks/demo.py` reports, JSON or gzipped JSON): per task,
answer EM against memory size, one line per run, a run's levels gathered from several report
files (one per `--sizes` call)."""

from __future__ import annotations

import gzip
import json
from typing import Sequence

TASKS = (("fact_lookup", "single-hop"), ("multi_hop", "multi-hop"), ("niah_single", "needle"))


def demo_levels(paths: Sequence[str]) -> list[dict]:
  """The memory levels of the demo reports at `paths`, by memory size (a later file's level of
  the same size replaces an earlier one's)."""
  levels = {}
  for path in paths:
    with (gzip.open(path) if path.endswith(".gz") else open(path, "rb")) as f:
      for lv in json.load(f)["levels"]:
        levels[lv["memory_tokens"]] = lv
  return [levels[k] for k in sorted(levels)]


def plot_runs(runs: dict[str, Sequence[str]], png_path: str, title: str, *,
              written_ids: Sequence[str] = (), tasks=TASKS, ylabel: str = "answer EM") -> None:
  """One panel per task: answer EM of each run (dashed for the first, solid after), and for the
  runs named in `written_ids` also the share whose written ids are exactly the gold set."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, len(tasks), figsize=(4.3 * len(tasks), 4.0), sharey=True)
  for (task, name), ax in zip(tasks, axes):
    for n, (run, paths) in enumerate(runs.items()):
      levels = demo_levels(paths)
      x = [lv["memory_tokens"] for lv in levels]
      ax.plot(x, [lv["summary"][task]["exact_match"] for lv in levels], "--" if n == 0 else "-",
              marker="o", label=run if not written_ids else f"answer EM, {run}")
      if run in written_ids:
        ax.plot(x, [lv["summary"][task]["retrieval_exact"] for lv in levels], ":", marker="s",
                label=f"written ids = gold, {run}")
    n_questions = levels[0]["summary"][task]["n"] if levels else 0
    ax.set_title(f"{name} ({n_questions})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("memory size (tokens)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(ylabel)
  axes[0].legend(fontsize=7 if written_ids else None, loc="lower left" if written_ids else "best")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)
