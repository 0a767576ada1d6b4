"""Writes a memory bank in the current format, or with its router keys in another dtype, without
re-encoding: a format-3 bank drops its template-head K/V (never read), a format-2 bank too with
its float32 router keys in bfloat16, and a float32 bank becomes a bfloat16 or int8 one.

  python tools/convert_bank.py --bank=/tmp/bank --out=/tmp/bank_v4 [--key_dtype=int8]
"""

from absl import flags

from msa_jax.cli import quiet_library_logs, run
from msa_jax.memory.convert import convert_bank
from msa_jax.model.router_keys import KEY_DTYPES

_BANK = flags.DEFINE_string("bank", None, "The bank to convert (left unchanged).", required=True)
_OUT = flags.DEFINE_string("out", None, "The new bank directory (must not exist).", required=True)
_KEY_DTYPE = flags.DEFINE_enum("key_dtype", None, list(KEY_DTYPES),
                               "Router key dtype of the new bank (default: the bank's own; "
                               "bfloat16 for a format-2 bank's float32 keys).")


def main(argv):
  del argv
  quiet_library_logs()
  convert_bank(_BANK.value, _OUT.value, _KEY_DTYPE.value)


if __name__ == "__main__":
  run(main)
