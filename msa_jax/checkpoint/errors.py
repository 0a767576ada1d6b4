"""The one error type of checkpoint reading, writing and conversion."""

import re


class CheckpointError(ValueError):
  """A checkpoint (input or output) is missing, corrupt, foreign or inconsistent; the message says how."""


def restore_error(what: str, e: Exception, hint: str = "") -> CheckpointError:
  """A failed orbax restore as one line: orbax wraps the storage error that says what is wrong
  (the innermost cause) in exceptions that print the whole tensorstore spec."""
  while e.__cause__ is not None:
    e = e.__cause__
  lines = str(e).strip().splitlines()
  detail = re.sub(r"\s*\[tensorstore_spec=.*", "", lines[0]) if lines else type(e).__name__
  return CheckpointError(f"cannot restore {what}: it is damaged or incomplete ({detail}){hint}")
