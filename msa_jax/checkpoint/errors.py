"""The one error type of checkpoint reading, writing and conversion."""


class CheckpointError(ValueError):
  """A checkpoint (input or output) is missing, corrupt, foreign or inconsistent; the message says how."""
