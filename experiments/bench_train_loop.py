"""Where a training step's time goes: the input pipeline alone, the device step alone, the loop.

  python experiments/bench_train_loop.py --config=experiments/configs/tiny_msa_aligned.json \
      --set=phases.0.memory_tokens=2048 --workers=0,15 --steps=30 --profile_dir=/tmp/prof \
      --output=/tmp/msa_jax_bench/train_loop.json

Prints the pipeline's ms/batch at each worker count, the jitted step's time on a batch already on
the device, the trainer loop's time per step, and (with --profile_dir) the device ops that take the
most time; writes the JSON report and a bar chart (.png) next to it. See benchmarks/train_loop.py.
"""

from absl import app, flags

from benchmarks import train_loop
from msa_jax.cli import quiet_library_logs, run

_CONFIG = flags.DEFINE_string("config", None, "JSON training config file.", required=True)
_SET = flags.DEFINE_multi_string("set", [], "Config override key.path=value (JSON value).")
_PHASE = flags.DEFINE_integer("phase", 0, "Which phase of the config to measure.")
_WORKERS = flags.DEFINE_list("workers", ["0"], "grain worker counts to time the pipeline at (the "
                             "largest feeds the loop).")
_STEPS = flags.DEFINE_integer("steps", 20, "Batches / steps timed per measurement.")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", None, "Write a jax.profiler trace here and "
                                   "summarize its device ops.")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 5, "Steps traced.")
_OUTPUT = flags.DEFINE_string("output", "/tmp/msa_jax_bench/train_loop.json",
                              "JSON report path (the chart goes next to it); empty: write nothing.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  settings = train_loop.LoopSettings(
      config=_CONFIG.value, overrides=tuple(_SET.value), phase=_PHASE.value,
      worker_counts=tuple(int(w) for w in _WORKERS.value), steps=_STEPS.value,
      profile_dir=_PROFILE_DIR.value, profile_steps=_PROFILE_STEPS.value)
  train_loop.run_and_write(settings, _OUTPUT.value or None)


if __name__ == "__main__":
  run(main)
