"""Benchmarks generation (time to first token, decode tokens/s, memory per device) through the
engine over a random memory, per device count and content tier.

  python experiments/bench_generate.py --out=/tmp/bench_generate      # msa-4b, 1M/10M/max, B 1,16
  python experiments/bench_generate.py --small --out=/tmp/bench_small # tiny, on a CPU
  python experiments/bench_generate.py --memory_tokens=10000000,30000000,100000000 \
      --fill_max=false --devices=2 --tiers=device,pinned_host --out=/tmp/bench_2gpu  # two GPUs

Writes bench_generate.json and bench_generate.png into --out (rewritten after each memory size) and
prints a table. The memory is a bank view filled directly with random pooled keys/values at the
model's shapes (nothing is encoded), sharded over the first N devices; weights are random. Method
and floors: benchmarks/generate.py.
"""

from absl import app, flags

from benchmarks import common
from benchmarks import generate as benchmark
from msa_jax.cli import quiet_library_logs, run

_SMALL = flags.DEFINE_bool("small", False, "Tiny model and memories (runs on a CPU); the flags "
                           "below that are given explicitly still apply.")
_PRESET = flags.DEFINE_enum("preset", "msa-4b", ["tiny", "msa-4b"], "Model shape (random weights).")
_MEMORY_TOKENS = flags.DEFINE_list("memory_tokens", ["1000000", "10000000"],
                                   "Memory sizes (tokens).")
_FILL_MAX = flags.DEFINE_bool("fill_max", True, "Also run the largest memory that fits the device.")
_DOC_LEN = flags.DEFINE_integer("doc_len", 1024, "Tokens per memory document.")
_BATCHES = flags.DEFINE_list("batches", ["1", "16"], "Batch sizes (requests per prefill/decode).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per request.")
_QUESTION_LEN = flags.DEFINE_integer("question_len", 64, "Routing (question) tokens per prompt.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "Decoded tokens per request (power of two).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per point (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed runs per point (compilation).")
_MAX_FRACTION = flags.DEFINE_float("max_fraction", 0.85, "Share of the free device memory the "
                                   "largest memory may take.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_DEVICES = flags.DEFINE_list("devices", ["1"], "Device counts: the memory is sharded over the "
                             "first N devices (memory parallel), the weights replicated.")
_TIERS = flags.DEFINE_list("tiers", ["device"], "Content tiers: device, pinned_host, tensorstore.")
_STORE_DIR = flags.DEFINE_string("store_dir", "", "Where the tensorstore tier writes its content "
                                 "(default: the system's temporary directory); removed after "
                                 "each memory size.")
_OUT = flags.DEFINE_string("out", "/tmp/msa_jax_bench/generate", "Output directory (JSON + PNG).")

_FIELDS = {"preset": _PRESET, "memory_tokens": _MEMORY_TOKENS, "fill_max": _FILL_MAX,
           "doc_len": _DOC_LEN, "batches": _BATCHES, "prompt_len": _PROMPT_LEN,
           "question_len": _QUESTION_LEN, "new_tokens": _NEW_TOKENS, "repeats": _REPEATS,
           "warmup": _WARMUP, "max_fraction": _MAX_FRACTION, "seed": _SEED, "devices": _DEVICES,
           "tiers": _TIERS, "store_dir": _STORE_DIR}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  values = {name: flag.value for name, flag in _FIELDS.items()
            if not _SMALL.value or flags.FLAGS[flag.name].present}
  for name in ("memory_tokens", "batches", "devices"):
    if name in values:
      values[name] = tuple(int(v) for v in values[name])
  try:
    settings = (benchmark.small_settings(**values) if _SMALL.value
                else benchmark.GenerateBenchSettings(**values))
  except (common.BenchError, ValueError) as e:
    raise app.UsageError(str(e)) from e
  report = benchmark.run_and_report(settings, _OUT.value)
  return 1 if any(r["status"] != "ok" for r in report["results"]) else 0


if __name__ == "__main__":
  run(main)
