"""Chart: the demo's 88 held-out questions (seed 21) on the shipped model, per task, against memory
size: the official loop with one document per router layer (this session; the demo's default now)
against router-picked rounds at the model's top 4 (session 17): answer EM and, for the official
loop, generative retrieval (the written ids exactly the gold set).

  python experiments/results/session18_2026-12-08/official_vs_routed_chart.py
"""

import os

from benchmarks.demo_compare import plot_runs

HERE = os.path.dirname(os.path.abspath(__file__))
S17 = os.path.join(HERE, "..", "session17_2026-12-07")
OFFICIAL = "official loop, top 1 per layer"
RUNS = {"router-picked rounds, top 4 (session 17)": [
            os.path.join(S17, "demo_needles_16k_to_256k.json.gz"),
            os.path.join(S17, "demo_needles_1m.json.gz"), os.path.join(S17, "demo_needles_4m.json.gz")],
        OFFICIAL: [os.path.join(HERE, p) for p in ("demo_official_k1_16k_64k.json.gz",
                                                   "demo_official_k1_256k_1m.json.gz",
                                                   "demo_official_k1_4m.json.gz")
                   if os.path.exists(os.path.join(HERE, p))]}

if __name__ == "__main__":
  plot_runs(RUNS, os.path.join(HERE, "demo_official_vs_routed.png"),
            "models/tiny_msa, 88 held-out demo questions (seed 21): the official loop at top 1 "
            "vs router-picked rounds", written_ids=(OFFICIAL,), ylabel="fraction of questions")
