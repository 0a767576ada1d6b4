"""Converts checkpoints between Hugging Face safetensors directories and msa_jax (orbax) directories.

  # HF (plain Qwen3 or MSA) -> msa_jax
  python tools/convert_checkpoint.py --direction=hf_to_msa_jax --input=/ckpt/Qwen3-4B --output=/ckpt/msa-4b
  # msa_jax -> HF (format auto = the source's; or qwen3 / msa)
  python tools/convert_checkpoint.py --direction=msa_jax_to_hf --input=/ckpt/msa-4b --output=/ckpt/msa-4b-hf
"""

from absl import flags

from msa_jax.checkpoint import convert
from msa_jax.cli import quiet_library_logs, run

_DIRECTION = flags.DEFINE_enum("direction", "hf_to_msa_jax", ["hf_to_msa_jax", "msa_jax_to_hf"],
                               "Which way to convert.")
_INPUT = flags.DEFINE_string("input", None, "Source directory.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Destination directory (written atomically).",
                              required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")
_SCORE_MODE = flags.DEFINE_enum("score_mode", None, ["cosine", "scaled_dot"],
                                "Override the router score mode read from an MSA config.json "
                                "(default: the official inference's gating).")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16", "float16"],
                                 "Store parameters in this dtype (default: the checkpoint's).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the router projections added to a plain Qwen3.")
_REQUIRE_TOKENIZER = flags.DEFINE_bool("require_tokenizer", True,
                                       "Fail when the HF directory has no tokenizer.json.")
_HF_FORMAT = flags.DEFINE_enum("hf_format", "auto", ["auto", "qwen3", "msa"],
                               "Output format of msa_jax_to_hf.")
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 2.0, "Largest safetensors shard written, in GiB.")
_ALLOW_NONFINITE = flags.DEFINE_bool("allow_nonfinite", False, "Convert weights holding NaN or inf "
                                     "(refused by default: they mean a broken checkpoint).")


def main(argv):
  del argv
  quiet_library_logs()
  if _DIRECTION.value == "hf_to_msa_jax":
    out = convert.hf_to_msa_jax(_INPUT.value, _OUTPUT.value, score_mode=_SCORE_MODE.value,
                                param_dtype=_PARAM_DTYPE.value, seed=_SEED.value,
                                overwrite=_OVERWRITE.value,
                                require_tokenizer=_REQUIRE_TOKENIZER.value,
                                allow_nonfinite=_ALLOW_NONFINITE.value)
  else:
    out = convert.msa_jax_to_hf(_INPUT.value, _OUTPUT.value, hf_format=_HF_FORMAT.value,
                                overwrite=_OVERWRITE.value,
                                max_shard_bytes=int(_MAX_SHARD_GB.value * (1 << 30)),
                                allow_nonfinite=_ALLOW_NONFINITE.value)
  print(f"wrote {out}")


if __name__ == "__main__":
  run(main)
