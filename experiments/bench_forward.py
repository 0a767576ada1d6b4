"""Benchmarks the MSA training forward and forward+backward with random weights.

  python experiments/bench_forward.py --preset=msa-4b --seq_len_mem=16384 --doc_len=1024 \
      --seq_len_prompt=512 --batch=1 --steps=10 --remat=full --output=/tmp/bench/msa4b.json

Prints a table (compile time, median step time, tokens/s, model TFLOP/s, MFU, peak device memory) and
writes the JSON report plus a tokens/s bar chart (same name, .png). Modes: "forward" evaluates the
training loss (LM + aux) without gradients; "train" is jax.value_and_grad of it w.r.t. the params. A
mode that runs out of memory is reported as OOM. FLOP accounting: benchmarks/forward.py.
"""

from absl import app, flags

from benchmarks import common, forward
from msa_jax import config as cfglib
from msa_jax.cli import quiet_library_logs, run
from msa_jax.kernels.segment_attention import api as attention_api

_PRESET = flags.DEFINE_enum("preset", "tiny", ["tiny", "msa-4b"], "Model shape (random weights).")
_SEQ_LEN_MEM = flags.DEFINE_integer("seq_len_mem", 16384, "Memory tokens per row.")
_DOC_LEN = flags.DEFINE_integer("doc_len", 1024, "Document length; documents fill each memory row "
                                "(a shorter last document takes any remainder).")
_SEQ_LEN_PROMPT = flags.DEFINE_integer("seq_len_prompt", 512, "Prompt tokens per row.")
_BATCH = flags.DEFINE_integer("batch", 1, "Rows per step.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per mode (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed runs per mode after compilation.")
_REMAT = flags.DEFINE_enum("remat", "none", list(cfglib.REMAT_POLICIES), "Layer remat policy.")
_SCAN_LAYERS = flags.DEFINE_bool("scan_layers", False, "Run layer blocks as nn.scan.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "bfloat16", list(cfglib.DTYPES),
                                 "Parameter dtype (compute is bfloat16).")
_MODES = flags.DEFINE_list("modes", list(forward.MODES), "Modes: forward, train.")
_QUESTION_LEN = flags.DEFINE_integer("question_len", 64, "Route (question) tokens per prompt, at "
                                     "most half of the prompt after the template head.")
_ATTENTION_IMPL = flags.DEFINE_enum("attention_impl", "blockwise",
                                    list(attention_api.IMPLEMENTATIONS),
                                    "Segment attention implementation (auto: by backend).")
_CE_CHUNK_SIZE = flags.DEFINE_integer("ce_chunk_size", 1024, "LM cross-entropy chunk length.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed for weights and tokens.")
_OUTPUT = flags.DEFINE_string("output", "/tmp/msa_jax_bench/bench_forward.json",
                              "JSON report path (the chart goes next to it); empty: write nothing.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  try:
    settings = forward.BenchSettings(
        preset=_PRESET.value, seq_len_mem=_SEQ_LEN_MEM.value, doc_len=_DOC_LEN.value,
        seq_len_prompt=_SEQ_LEN_PROMPT.value, batch=_BATCH.value, steps=_STEPS.value,
        warmup=_WARMUP.value, remat=_REMAT.value, scan_layers=_SCAN_LAYERS.value,
        param_dtype=_PARAM_DTYPE.value, modes=tuple(_MODES.value),
        question_len=_QUESTION_LEN.value, attention_impl=_ATTENTION_IMPL.value,
        ce_chunk_size=_CE_CHUNK_SIZE.value, seed=_SEED.value)
  except common.BenchError as e:
    raise app.UsageError(str(e)) from e
  report = forward.run_and_report(settings, _OUTPUT.value or None)
  if any(r["status"] == "error" for r in report["results"].values()):
    return 1
  return 0


if __name__ == "__main__":
  run(main)
