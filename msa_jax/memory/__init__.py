"""The memory bank: encode a corpus once into a directory of tensorstore arrays, open it for
serving (`open_bank`), route over it and gather the selected documents' chunks."""

from msa_jax.memory.bank import Bank, open_bank
from msa_jax.memory.errors import BankError

__all__ = ["Bank", "BankError", "open_bank"]
