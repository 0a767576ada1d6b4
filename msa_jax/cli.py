"""Helpers shared by the absl binaries in experiments/ and tools/: quiet library logs, and one clean
line, not a traceback, for the errors a user can fix."""

import os
import sys

from absl import app, flags, logging

from msa_jax.data.tokenizer import MissingSpecialTokenError
from msa_jax.inference.judge import JudgeError

# Bad input, files, banks, checkpoints, configs, tokenizers, the judge: every library error type
# (BankError, CheckpointError, RecordError, TrainConfigError, ... are ValueErrors) and the OS's.
DOMAIN_ERRORS = (ValueError, OSError, JudgeError, MissingSpecialTokenError)


def quiet_library_logs() -> None:
  """orbax logs every step of a save at INFO; binaries show warnings only unless --verbosity is set."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def run(main) -> None:
  """`app.run(main)`, where a domain error ends the binary with exit status 1 and the one line
  `<binary>: <message>` (with --verbosity=1 or more, the traceback as well)."""

  def guarded(argv):
    try:
      return main(argv)
    except DOMAIN_ERRORS as e:
      if flags.FLAGS["verbosity"].value >= 1:
        raise
      name = os.path.splitext(os.path.basename(sys.argv[0]))[0]
      sys.exit(f"{name}: {' '.join(str(e).split()) or type(e).__name__}")

  app.run(guarded)
