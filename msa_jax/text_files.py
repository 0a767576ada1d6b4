"""UTF-8 text files read so that a decoding error names the file and the line, not just a byte
offset in a `UnicodeDecodeError` from somewhere inside a reader."""

from __future__ import annotations

from typing import Iterator


def _error(error: type[Exception], path: str, line: int, e: UnicodeDecodeError) -> Exception:
  return error(f"{path}:{line}: not UTF-8 text ({e.reason}: byte {e.object[e.start]:#04x}); save "
               f"the file as UTF-8")


def utf8_lines(path: str, error: type[Exception] = ValueError) -> Iterator[tuple[int, str]]:
  """(line number, text) of every line of `path`; a line that is not UTF-8 raises `error`."""
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        yield lineno, raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise _error(error, path, lineno, e) from None


def read_utf8(path: str, error: type[Exception] = ValueError) -> str:
  """The text of `path`; raises `error` naming the line of the first byte that is not UTF-8."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise _error(error, path, data.count(b"\n", 0, e.start) + 1, e) from None
