"""Chart: the demo's 88 held-out questions (seed 21), per task, against memory size, for the wide
stage (session 16) and the needles stage (this session), from the demo JSONs kept here and there.

  python experiments/results/session17_2026-12-07/compare_chart.py
"""

import gzip
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = {"wide (session 16)": ["../session16_2026-12-07/demo_routed_16k_to_1m.json.gz",
                              "../session16_2026-12-07/demo_routed_4m.json.gz"],
        "needles (shipped)": ["demo_needles_16k_to_256k.json.gz", "demo_needles_1m.json.gz",
                               "demo_needles_4m.json.gz"]}
TASKS = (("fact_lookup", "single-hop (48)"), ("multi_hop", "multi-hop (24)"),
         ("niah_single", "needle (16)"))


def levels(files):
  out = {}
  for name in files:
    with gzip.open(os.path.join(HERE, name)) as f:
      for lv in json.load(f)["levels"]:
        out[lv["memory_tokens"]] = lv
  return [out[k] for k in sorted(out)]


def main():
  fig, axes = plt.subplots(1, len(TASKS), figsize=(13.0, 4.0), sharey=True)
  for (task, title), ax in zip(TASKS, axes):
    for (run, files), style in zip(RUNS.items(), ("--", "-")):
      lvs = levels(files)
      ax.plot([lv["memory_tokens"] for lv in lvs],
              [lv["summary"][task]["exact_match"] for lv in lvs], style, marker="o", label=run)
    ax.set_xscale("log", base=2)
    ax.set_title(title)
    ax.set_xlabel("memory size (tokens)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("answer EM (router-picked rounds)")
  axes[0].legend()
  fig.suptitle("models/tiny_msa on 88 held-out demo questions (seed 21): wide vs needles stage")
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, "demo_wide_vs_needles.png"), dpi=100)


if __name__ == "__main__":
  main()
