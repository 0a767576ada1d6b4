"""Formatting shared by the library's progress lines (training, encoding a corpus)."""

from __future__ import annotations

import math


def format_duration(seconds: float) -> str:
  """`1h02m03s`, `4m05s`, or `?` for an unknown (infinite or NaN) duration."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
