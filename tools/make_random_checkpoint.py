"""Writes a random Hugging Face checkpoint of a preset's shape (no download, no torch needed).

  python tools/make_random_checkpoint.py --preset=tiny --output=/tmp/tiny_hf
"""

from absl import flags

from msa_jax import config as cfglib
from msa_jax.checkpoint.random_hf import write_random_hf_checkpoint
from msa_jax.cli import quiet_library_logs, run

_PRESET = flags.DEFINE_enum("preset", "tiny", sorted(cfglib.PRESETS), "Model shape.")
_OUTPUT = flags.DEFINE_string("output", None, "Destination directory.", required=True)
_FORMAT = flags.DEFINE_enum("format", "qwen3", ["qwen3", "msa"],
                            "Plain Qwen3, or MSA with router weights and msa_config.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")


def main(argv):
  del argv
  quiet_library_logs()
  model_cfg, msa_cfg = cfglib.preset(_PRESET.value)
  out = write_random_hf_checkpoint(_OUTPUT.value, model_cfg,
                                   msa_cfg if _FORMAT.value == "msa" else None,
                                   seed=_SEED.value, overwrite=_OVERWRITE.value)
  print(f"wrote {out}")


if __name__ == "__main__":
  run(main)
