"""Writes a memory bank with its router keys in another dtype: converts a format-2 bank (float32
keys) to the current format without re-encoding, or a float32 bank to bfloat16 or int8.

  python tools/convert_bank.py --bank=/tmp/bank --out=/tmp/bank_bf16 [--key_dtype=int8]
"""

from absl import flags

from msa_jax.cli import quiet_library_logs, run
from msa_jax.memory.convert import convert_bank
from msa_jax.model.router_keys import DEFAULT_KEY_DTYPE, KEY_DTYPES

_BANK = flags.DEFINE_string("bank", None, "The bank to convert (left unchanged).", required=True)
_OUT = flags.DEFINE_string("out", None, "The new bank directory (must not exist).", required=True)
_KEY_DTYPE = flags.DEFINE_enum("key_dtype", DEFAULT_KEY_DTYPE, list(KEY_DTYPES),
                               "Router key dtype of the new bank.")


def main(argv):
  del argv
  quiet_library_logs()
  convert_bank(_BANK.value, _OUT.value, _KEY_DTYPE.value)


if __name__ == "__main__":
  run(main)
