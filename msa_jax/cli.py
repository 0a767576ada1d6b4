"""Helpers shared by the absl binaries in experiments/ and tools/."""

from absl import flags, logging


def quiet_library_logs() -> None:
  """orbax logs every step of a save at INFO; binaries show warnings only unless --verbosity is set."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
