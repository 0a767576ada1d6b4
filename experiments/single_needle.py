"""RULER's single needle (S-NIAH) at scale on CPU or GPU: each needle question is asked of a
haystack memory holding only its own needle, with the haystack encoded once
(`benchmarks/single_needle.py`). Prints each question and a summary; writes JSON and a PNG.

  python experiments/single_needle.py --memory_tokens=1048576 --num_needle=16 --seed=31 \\
      --out=/tmp/niah_1m
"""

import os

from absl import flags

import msa_jax
from benchmarks.common import repo_file
from benchmarks.demo import demo_interleave
from benchmarks.single_needle import NeedleSettings, format_summary, run_single_needle, write_report
from msa_jax.cli import quiet_library_logs, run

_CHECKPOINT = flags.DEFINE_string("checkpoint", repo_file("models", "tiny_msa"),
                                  "Trained msa_jax checkpoint (with its tokenizer.json).")
_MEMORY = flags.DEFINE_integer("memory_tokens", NeedleSettings.memory_tokens,
                               "Tokens of each question's memory (haystack and needle).",
                               lower_bound=1)
_NUM = flags.DEFINE_integer("num_needle", NeedleSettings.num_needle, "Needle questions.",
                            lower_bound=1)
_SEED = flags.DEFINE_integer("seed", NeedleSettings.seed, "Seed of the needles and haystack.")
_TOP_K = flags.DEFINE_integer("top_k_docs", NeedleSettings.top_k_docs, "Documents each router "
                              "layer selects (0: the model's own top_k_docs).", lower_bound=0)
_ROUTED_IDS = flags.DEFINE_bool("routed_ids", False, "Each round the model writes one id among the "
                                 "documents the router selected (constrained decoding) instead "
                                 "of any id (the official loop, the default).")
_ROUTED_CHOICES = flags.DEFINE_integer("routed_choices", 1, "With --routed_ids: offer only this "
                                       "many routed documents, best router score first (0: all; "
                                       "1: the router picks).")
_OUT = flags.DEFINE_string("out", "/tmp/msa_single_needle", "Output directory (single_needle.json "
                           "and .png; the banks are built in it and removed).")


def main(argv):
  del argv
  quiet_library_logs()
  loaded = msa_jax.load(_CHECKPOINT.value)
  given = lambda holder: holder.value if holder.present else None
  settings = NeedleSettings(memory_tokens=_MEMORY.value, num_needle=_NUM.value, seed=_SEED.value,
                            top_k_docs=_TOP_K.value or None,
                            interleave=demo_interleave(routed_ids=given(_ROUTED_IDS),
                                                       routed_choices=given(_ROUTED_CHOICES)))
  result = run_single_needle(loaded, settings, _OUT.value)
  print(format_summary(result))
  json_path, png_path = write_report(result, _OUT.value)
  print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
  run(main)
