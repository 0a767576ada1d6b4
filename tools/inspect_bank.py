"""Prints a memory bank's manifest summary, array shapes and a few documents.

  python tools/inspect_bank.py --bank=/tmp/bank [--verify] [--docs=5]
"""

from absl import flags

from msa_jax.cli import quiet_library_logs, run
from msa_jax.memory.bank import open_bank
from msa_jax.memory.describe import describe

_BANK = flags.DEFINE_string("bank", None, "The bank directory.", required=True)
_VERIFY = flags.DEFINE_bool("verify", False, "Verify every array against its checksums (reads "
                            "the whole bank).")
_DOCS = flags.DEFINE_integer("docs", 3, "How many documents to show.")


def main(argv):
  del argv
  quiet_library_logs()
  bank = open_bank(_BANK.value, verify="full" if _VERIFY.value else "index",
                   allow_incomplete=True)
  print(describe(bank, _DOCS.value))
  if _VERIFY.value:
    print("verified: every array matches its checksums")


if __name__ == "__main__":
  run(main)
