"""Chart: the demo's 88 held-out questions (seed 21), per task, against memory size, for the wide
stage (session 16) and the needles stage (this session), from the demo JSONs kept here and there.

  python experiments/results/session17_2026-12-07/compare_chart.py
"""

import os

from benchmarks.demo_compare import plot_runs

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = {"wide (session 16)": ["../session16_2026-12-07/demo_routed_16k_to_1m.json.gz",
                              "../session16_2026-12-07/demo_routed_4m.json.gz"],
        "needles (shipped)": ["demo_needles_16k_to_256k.json.gz", "demo_needles_1m.json.gz",
                               "demo_needles_4m.json.gz"]}

if __name__ == "__main__":
  plot_runs({run: [os.path.join(HERE, p) for p in paths] for run, paths in RUNS.items()},
            os.path.join(HERE, "demo_wide_vs_needles.png"),
            "models/tiny_msa on 88 held-out demo questions (seed 21): wide vs needles stage",
            ylabel="answer EM (router-picked rounds)")
