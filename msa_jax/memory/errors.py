"""The one error type of the memory bank: reading, writing, encoding and validating banks."""


class BankError(ValueError):
  """A bank or a corpus is missing, corrupt, foreign, inconsistent or invalid; the message says how
  and, where it helps, what to do about it."""
