"""Checks every benchmark test shares: bad flags are refused before anything runs, and a report is
written whole or not at all."""

from __future__ import annotations

import json
import os

import pytest

from tests.binary_runner import run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_flags_refused(binary: str, out_flag: str, out_path: str, *bad: str, match: str) -> None:
  """`experiments/<binary>` with the `bad` flags exits non-zero naming the problem, writes nothing
  to `out_path`, and never gets as far as a traceback."""
  result = run_python([os.path.join(ROOT, "experiments", binary), *bad, f"--{out_flag}={out_path}"],
                      cwd=ROOT, timeout=300,
                      env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
  assert result.returncode != 0, result.stdout[-2000:]
  assert match in result.stderr, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert not os.path.exists(out_path)


def assert_report_write_is_atomic(module, monkeypatch, target: str, json_path: str,
                                  png_path: str) -> None:
  """A chart that dies half-written leaves the earlier PNG intact and no stray temporary file;
  the JSON beside it is whole (old or new, never truncated)."""
  os.makedirs(os.path.dirname(png_path), exist_ok=True)
  with open(json_path, "w") as f:
    json.dump({"old": True}, f)
  with open(png_path, "wb") as f:
    f.write(b"old chart")

  def dying_chart(report, path):
    with open(path, "wb") as f:
      f.write(b"\x89PNG half")
    raise RuntimeError("chart died")

  monkeypatch.setattr(module, "write_chart", dying_chart)
  with pytest.raises(RuntimeError, match="chart died"):
    module.write_report({"new": list(range(1000))}, target)
  with open(png_path, "rb") as f:
    assert f.read() == b"old chart"
  with open(json_path) as f:
    assert json.load(f) in ({"old": True}, {"new": list(range(1000))})
  assert sorted(os.listdir(os.path.dirname(png_path))) == sorted(
      {os.path.basename(json_path), os.path.basename(png_path)})
