"""An append-only JSONL file of finished work, so that a long job that is killed, or whose judge
fails, resumes where it stopped instead of starting over.

The first line is a header (the settings the work was done under); a rerun under other settings
is refused rather than mixing the two. Every record is one line written by a single `write` to the
file opened for appending, then fsynced, so after a kill the file holds whole records, at most
followed by one torn line (the record being written), which reading cuts off.
"""

from __future__ import annotations

import json
import os
from typing import Any


class JsonlLog:
  """Records (JSON objects) appended under `header`; `read()` returns those already written."""

  def __init__(self, path: str, header: dict[str, Any]):
    self.path = path
    self.header = json.loads(json.dumps(header))  # as it reads back

  def read(self) -> list[dict]:
    """The records of an earlier run under the same header ([] when there is none); raises
    ValueError when the file was written under another header or is not such a log."""
    if not os.path.exists(self.path):
      return []
    with open(self.path, "rb") as f:
      data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # a kill in the middle of a write
      os.truncate(self.path, end)
    lines = data[:end].splitlines()
    records = []
    for lineno, line in enumerate(lines, start=1):
      try:
        records.append(json.loads(line))
      except ValueError as e:
        raise ValueError(f"{self.path}:{lineno}: not a JSON record ({e}); is this a progress "
                         f"file of this program?") from None
    if not records:
      return []
    header = records[0].get("header") if isinstance(records[0], dict) else None
    if header != self.header:
      diff = [f"{k}: {(header or {}).get(k)!r} there, {self.header.get(k)!r} now"
              for k in sorted(set(header or {}) | set(self.header))
              if (header or {}).get(k) != self.header.get(k)]
      raise ValueError(f"{self.path} holds the progress of a run under other settings "
                       f"({'; '.join(diff)}); remove it to start over")
    return records[1:]

  def append(self, record: dict) -> None:
    """Writes one record durably (the header first, into a new file)."""
    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      lines = [record]
      if os.fstat(fd).st_size == 0:
        lines.insert(0, {"header": self.header})
      data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines).encode("utf-8")
      while data:
        data = data[os.write(fd, data):]
      os.fsync(fd)
    finally:
      os.close(fd)
