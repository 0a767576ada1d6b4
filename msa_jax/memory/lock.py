"""One writer per bank: an exclusive lock held for a whole encode or append.

The lock is an `flock` on a file next to the bank (`.<name>.lock`), so it also covers a bank that
does not exist yet. The kernel drops an flock when its holder dies, so a killed writer never blocks
the next one. The holder records itself (pid, host, start time, command) in the file and removes
the file when it finishes, so a refused writer is told who holds the bank, and a writer that finds
the file but a free lock knows the previous holder died and says whose lock it takes over.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from typing import Callable

from msa_jax.memory.errors import BankError


def lock_path(bank_dir: str) -> str:
  bank_dir = os.path.abspath(bank_dir)
  return os.path.join(os.path.dirname(bank_dir), f".{os.path.basename(bank_dir)}.lock")


def _describe(holder: dict) -> str:
  if not holder:
    return "another process (it has not recorded itself yet)"
  return (f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')}: "
          f"{holder.get('command')})")


class BankLock:
  """`with BankLock(path, log):` holds the bank at `path` for writing, or raises `BankError`
  naming the live holder."""

  def __init__(self, bank_dir: str, log: Callable[[str], None] = print):
    self.bank_dir = os.path.abspath(bank_dir)
    self.path = lock_path(bank_dir)
    self.log = log
    self._fd: int | None = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def _holder(self, fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 1 << 16)
    try:
      return json.loads(data) if data.strip() else {}
    except ValueError:
      return {"pid": "?", "host": "?", "since": "?", "command": f"unreadable record {data[:60]!r}"}

  def _acquire(self) -> int:
    """An fd holding the flock of the file now at `self.path` (a holder that finished may remove
    the file between our open and our flock: then lock the new one)."""
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = self._holder(fd)
        os.close(fd)
        raise BankError(f"bank {self.bank_dir} is being written by {_describe(holder)}; a bank "
                        f"has one writer at a time: wait for it to finish, then run "
                        f"again") from None
      try:
        if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
          return fd
      except FileNotFoundError:
        pass
      os.close(fd)

  def __enter__(self) -> "BankLock":
    fd = self._acquire()
    previous = self._holder(fd)
    if previous:
      self.log(f"bank {self.bank_dir}: taking over the write lock of {_describe(previous)}, which "
               f"ended without releasing it")
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    fd, self._fd = self._fd, None
    with contextlib.suppress(FileNotFoundError):  # before unlocking: nobody to take over from
      os.remove(self.path)
    os.close(fd)

  def check(self) -> None:
    """Raises unless this lock is held (bank writes happen only under it)."""
    if not self.held:
      raise BankError(f"internal error: writing bank {self.bank_dir} without holding its lock")
