"""Benchmarks the memory bank: exact sharded routing against its bandwidth floor, fetch per content
tier, and encode throughput (benchmarks/memory.py says what each part measures).

  python experiments/bench_memory.py --out=/tmp/bench_memory            # msa-4b shape, 1M-100M tokens
  python experiments/bench_memory.py --small --out=/tmp/bench_memory    # tiny sizes (CPU smoke run)

Writes bench_memory.json and bench_memory.png (routing time vs memory size with the floor) into --out
and prints a table.
"""

from absl import app, flags

from benchmarks import common
from benchmarks import memory as benchmark
from msa_jax.cli import quiet_library_logs, run
from msa_jax.kernels.routing.api import IMPLEMENTATIONS
from msa_jax.model.router_keys import KEY_DTYPES

_OUT = flags.DEFINE_string("out", "/tmp/msa_jax_bench/memory", "Output directory.")
_SMALL = flags.DEFINE_bool("small", False, "Tiny sizes for a CPU run (other flags then override).")
_PRESET = flags.DEFINE_string("preset", None, "Model shape for routing and fetch (msa-4b).")
_MEMORY_TOKENS = flags.DEFINE_list("memory_tokens", None, "Bank sizes in tokens (1M,10M,100M).")
_BATCHES = flags.DEFINE_list("batches", None, "Query batch sizes (1,16).")
_ROUTE_TOKENS = flags.DEFINE_integer("route_tokens", None, "Router-query tokens per request (64).")
_KEY_DTYPE = flags.DEFINE_enum("key_dtype", None, list(KEY_DTYPES), "Router key dtype (bfloat16).")
_ROUTING = flags.DEFINE_enum("routing_kernel", None, list(IMPLEMENTATIONS),
                             "Routing implementation (auto: the backend's fused kernel).")
_TIERS = flags.DEFINE_list("tiers", None, "Content tiers to time (device,pinned_host,tensorstore).")
_ENCODE_PRESET = flags.DEFINE_string("encode_preset", None, "Model shape for the encode (msa-4b).")
_ENCODE_TOKENS = flags.DEFINE_integer("encode_tokens", None, "Corpus size to encode (262144).")
_STEPS = flags.DEFINE_integer("steps", None, "Timed runs per measurement (median reported; 20).")
_WARMUP = flags.DEFINE_integer("warmup", None, "Untimed runs after compilation (3).")
_SEED = flags.DEFINE_integer("seed", None, "Random seed.")
_TOKENIZER = flags.DEFINE_string("tokenizer", common.repo_file("models", "tiny_msa", "tokenizer.json"),
                                 "tokenizer.json for the encode part's corpus (default: the shipped "
                                 "tiny model's, resolved from the repository root).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  overrides = {name: value for name, value in (
      ("preset", _PRESET.value),
      ("memory_tokens", _MEMORY_TOKENS.value and tuple(int(float(x)) for x in _MEMORY_TOKENS.value)),
      ("batches", _BATCHES.value and tuple(int(x) for x in _BATCHES.value)),
      ("route_tokens", _ROUTE_TOKENS.value), ("tiers", _TIERS.value and tuple(_TIERS.value)),
      ("key_dtype", _KEY_DTYPE.value), ("routing_kernel", _ROUTING.value),
      ("encode_preset", _ENCODE_PRESET.value), ("encode_tokens", _ENCODE_TOKENS.value),
      ("steps", _STEPS.value), ("warmup", _WARMUP.value), ("seed", _SEED.value),
      ("tokenizer", _TOKENIZER.value))
      if value is not None}
  try:
    settings = (benchmark.small_settings(**overrides) if _SMALL.value
                else benchmark.MemoryBenchSettings(**overrides))
  except common.BenchError as e:
    raise app.UsageError(str(e)) from e
  report = benchmark.run(settings, _OUT.value)  # writes the report after every part
  json_path, png_path = benchmark.write_report(report, _OUT.value)
  print(benchmark.format_table(report))
  print(f"wrote {json_path} and {png_path}")
  failed = [r for part in ("routing", "fetch") for r in report[part] if r.get("status") == "error"]
  return 1 if failed or report["encode"].get("status") == "error" else 0


if __name__ == "__main__":
  run(main)
