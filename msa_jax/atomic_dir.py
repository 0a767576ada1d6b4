"""Write a file, a JSON report with its chart, or a directory completely or not at all: build it
under a temporary sibling, rename at the end."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Any, Callable


def temp_sibling_dir(path: str) -> str:
  """A fresh hidden directory next to `path` (same filesystem, so a rename into place is atomic)."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
  os.makedirs(tmp)
  return tmp


def atomic_write_text(path: str, text: str) -> None:
  """Replaces the file `path` with `text`: a reader sees the old file or the new one, never half."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    _remove(tmp)
    raise


def atomic_write_file(path: str, write: Callable[[str], Any]) -> str:
  """Replaces the file `path` with what `write(tmp)` writes to a temporary sibling (which keeps the
  extension, so a writer that infers the format from it, like matplotlib, still can)."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}"
                     f"{os.path.splitext(path)[1]}")
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    _remove(tmp)
    raise
  return path


def write_json_and_chart(report: dict[str, Any], json_path: str, png_path: str,
                         chart: Callable[[dict[str, Any], str], Any]) -> tuple[str, str]:
  """A report as indented JSON and `chart(report, path)` as a PNG, each written whole or not at all
  (the reports of the benchmarks, the demo and experiments/in_context_recall.py)."""

  def dump(path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
      f.write("\n")

  atomic_write_file(json_path, dump)
  atomic_write_file(png_path, lambda tmp: chart(report, tmp))
  return json_path, png_path


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False):
  """Yields a fresh temporary directory that becomes `path` only if the block succeeds.

  On any exception the temporary directory is removed and `path` is left as it was. An existing
  `path` is an error unless `overwrite`, in which case it is replaced only after success.
  """
  path = os.path.abspath(path)
  if os.path.lexists(path) and not overwrite:
    raise FileExistsError(f"output {path} already exists (pass overwrite to replace it)")
  tmp = temp_sibling_dir(path)
  try:
    yield tmp
    if os.path.lexists(path):  # (a file or a link as well as a directory)
      old = f"{tmp}.old"
      os.rename(path, old)
      try:
        os.rename(tmp, path)
      except BaseException:
        os.rename(old, path)
        raise
      _remove(old)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(OSError):
      os.remove(path)
