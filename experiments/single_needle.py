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
from benchmarks.demo_flags import define_retrieval_flags
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
_RETRIEVAL = define_retrieval_flags()
_OUT = flags.DEFINE_string("out", "/tmp/msa_single_needle", "Output directory (single_needle.json "
                           "and .png; the banks are built in it and removed).")


def main(argv):
  del argv
  quiet_library_logs()
  loaded = msa_jax.load(_CHECKPOINT.value)
  settings = NeedleSettings(memory_tokens=_MEMORY.value, num_needle=_NUM.value, seed=_SEED.value,
                            interleave=_RETRIEVAL.interleave(),
                            top_k_docs=_RETRIEVAL.selected_documents())
  result = run_single_needle(loaded, settings, _OUT.value)
  print(format_summary(result))
  json_path, png_path = write_report(result, _OUT.value)
  print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
  run(main)
