"""The memory demo: single-hop and multi-hop questions asked of no memory (the baseline) and of
synthetic memories of 16K and 64K tokens with the shipped tiny model; prints every question's
retrieval rounds and answer, then a table of memory size vs accuracy, saved as JSON and PNG.

  python experiments/demo.py                                       # ~1 minute on 2 CPU cores
  python experiments/demo.py --memory_tokens=1048576 --sizes=16384,65536,262144   # 16K to 1M
  python experiments/demo.py --num_single=32 --num_multi=16        # finer accuracy
  python experiments/demo.py --num_needle=8                        # RULER-style needles too
  python experiments/demo.py --router_only                         # retrieve by router score
  python experiments/demo.py --routed_ids                          # router-picked rounds
  python experiments/demo.py --top_k_docs=0                        # the model's own top-k (4)

By default the demo runs the official loop, generative retrieval: each Memory Interleave round
the model writes the ids of the documents it wants, or `<End-of-Retrieve>` and the answer, with
each router layer selecting one document (`--top_k_docs=1`). The shipped tiny model reads a
whole id exactly from one selected document, but among the 4 it trained with it picks the
question's only about half the time (BENCHMARKS.md §18). `--routed_ids` lets the router pick each
round's document and the model only decide when it has enough.
"""

from absl import app, flags

import msa_jax
from benchmarks.common import repo_file
from benchmarks.demo import DemoSettings, format_table, run_demo, write_report
from benchmarks.demo_flags import define_retrieval_flags
from benchmarks.demo_diagnosis import format_diagnosis
from msa_jax.cli import quiet_library_logs, run

_CHECKPOINT = flags.DEFINE_string("checkpoint", repo_file("models", "tiny_msa"),
                                  "Trained msa_jax checkpoint (with its tokenizer.json).")
_MEMORY = flags.DEFINE_integer("memory_tokens", max(DemoSettings.sizes),
                               "The largest memory, in tokens.")
_SIZES = flags.DEFINE_list("sizes", [str(s) for s in sorted(DemoSettings.sizes)[:-1]],
                           "Smaller memory sizes to compare (those above --memory_tokens are "
                           "dropped).")
_SINGLE = flags.DEFINE_integer("num_single", DemoSettings.num_single,
                               "Single-hop (fact lookup) questions.")
_MULTI = flags.DEFINE_integer("num_multi", DemoSettings.num_multi,
                              "Multi-hop (2-4 step chain) questions.")
_NEEDLE = flags.DEFINE_integer("num_needle", DemoSettings.num_needle,
                               "RULER-style single-needle questions (the magic number of a key "
                               "hidden in filler; needles sit among haystacks once the memory "
                               "holds all 3,600 people, from ~160K tokens).")
_MAX_DOC = flags.DEFINE_integer("max_doc_tokens", DemoSettings.max_doc_tokens,
                                "Longest synthetic document, in tokens (the shortest is "
                                f"{DemoSettings.min_doc_tokens}).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the questions and memories.")
_RETRIEVAL = define_retrieval_flags()
_BATCH = flags.DEFINE_integer("batch_size", DemoSettings.batch_size, "Questions per prefill "
                              "(routing over the bank holds a [batch, prompt, chunks] score array: "
                              "mind the memory).")
_DEVICES = flags.DEFINE_integer("memory_devices", None, "Devices the bank is sharded over "
                                "(default: all).")
_OUT = flags.DEFINE_string("out", "/tmp/msa_demo", "Output directory (demo.json, demo.png; banks "
                           "are built in it and removed).")


def main(argv):
  del argv
  quiet_library_logs()
  try:
    smaller = [int(s) for s in _SIZES.value if s.strip()]
    sizes = sorted({s for s in smaller if s < _MEMORY.value} | {_MEMORY.value})
  except ValueError:
    raise app.UsageError(f"--sizes must be integers, got {_SIZES.value}") from None
  loaded = msa_jax.load(_CHECKPOINT.value)
  settings = DemoSettings(sizes=tuple(sizes), num_single=_SINGLE.value, num_multi=_MULTI.value,
                          num_needle=_NEEDLE.value, seed=_SEED.value,
                          max_doc_tokens=_MAX_DOC.value, interleave=_RETRIEVAL.interleave(),
                          batch_size=_BATCH.value, memory_devices=_DEVICES.value,
                          top_k_docs=_RETRIEVAL.selected_documents())
  report = run_demo(loaded, settings, work_dir=_OUT.value)
  print()
  print(format_table(report))
  for level in report["levels"]:
    print(format_diagnosis(level["label"], level["diagnosis"]))
  json_path, png_path = write_report(report, _OUT.value)
  print(f"\n{report['questions']} questions, {report['seconds']:.0f} s; wrote {json_path} and "
        f"{png_path}")


if __name__ == "__main__":
  run(main)
