"""Training metrics: progress lines with throughput and ETA, a JSONL file, and a PNG of the curves.

The JSONL file has one object per logged step. A resumed run first drops the lines past its
restored step, so the file (and the plot) read as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from msa_jax.formatting import format_duration


def truncate_jsonl(path: str, last_step: int) -> None:
  """Keeps only the records with step <= last_step (atomically)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    keep = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


class MetricsLog:
  """Accumulates per-step metrics and, every `every` steps, writes their mean (one JSONL line and one
  progress line: step, phase, losses, recall, tokens/s, step time, ETA)."""

  def __init__(self, path: str, *, total_steps: int, start_step: int, every: int,
               printer: Callable[[str], None] = print):
    self.path, self.total_steps, self.every, self.printer = path, total_steps, every, printer
    truncate_jsonl(path, start_step)
    self._pending: list[Mapping[str, Any]] = []
    self._tokens = 0
    self._window_start = time.perf_counter()
    self._run_start_step = start_step
    self._run_start = self._window_start

  def record(self, step: int, phase: str, metrics: Mapping[str, Any], tokens: int, *,
             flush: bool = False) -> None:
    """Adds one finished step (`step` = steps done so far; metrics may be device scalars, fetched
    at the flush); flushes every `every` steps, and where `flush` (a phase end or a checkpoint:
    a window then never mixes phases, and a run resumed from a checkpoint starts a new window
    exactly where the uninterrupted run did)."""
    self._pending.append(metrics)
    self._tokens += tokens
    if flush or step % self.every == 0 or step == self.total_steps:
      self._flush(step, phase)

  def _flush(self, step: int, phase: str) -> None:
    now = time.perf_counter()
    n = len(self._pending)
    elapsed = now - self._window_start
    pending = jax.device_get(self._pending)  # one transfer per window, not one per step
    mean = {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}
    done = step - self._run_start_step
    rate = done / max(now - self._run_start, 1e-9)
    eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
    row = {"step": step, "phase": phase, **mean, "tokens_per_s": self._tokens / elapsed,
           "step_time_s": elapsed / n}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    shown = " ".join(f"{k} {v:.4g}" for k, v in mean.items()
                     if k in ("loss", "grad_norm", "lr") or k.endswith("_loss")
                     or k.startswith("recall@1/") or k.startswith("recall@5/"))
    self.printer(f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.1f}%) "
                 f"[{phase}] {shown} | {row['tokens_per_s']:.4g} tok/s, "
                 f"{row['step_time_s'] * 1e3:.1f} ms/step, ETA {format_duration(eta)}")
    self._pending, self._tokens, self._window_start = [], 0, now


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(jsonl_path: str, png_path: str) -> None:
  """Loss terms, router recall per layer, gradient norm / learning rate and throughput vs step."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_jsonl(jsonl_path)
  if not rows:
    return
  steps = [r["step"] for r in rows]
  keys = sorted({k for r in rows for k in r})

  def series(k):
    return [r.get(k, np.nan) for r in rows]

  fig, axes = plt.subplots(2, 2, figsize=(12, 8))
  panels = [
      (axes[0, 0], [k for k in keys if k == "loss" or k.endswith("_loss")], "loss", True),
      (axes[0, 1], [k for k in keys if k.startswith("recall@")], "router recall", False),
      (axes[1, 0], [k for k in ("grad_norm", "lr") if k in keys], "grad norm / lr", True),
      (axes[1, 1], ["tokens_per_s"], "tokens/s", False),
  ]
  for ax, names, title, log in panels:
    for k in names:
      ax.plot(steps, series(k), label=k)
    ax.set_title(title)
    ax.set_xlabel("step")
    if log:
      ax.set_yscale("log")
    if names:
      ax.legend(fontsize=7)
  phases = [(r["step"], r["phase"]) for i, r in enumerate(rows)
            if i == 0 or r["phase"] != rows[i - 1]["phase"]]
  for ax in axes.flat:
    for s, _ in phases[1:]:
      ax.axvline(s, color="gray", lw=0.5, ls="--")
  fig.suptitle("training curves (" + ", ".join(f"{p} from step {s}" for s, p in phases) + ")")
  fig.tight_layout()
  tmp = png_path + ".tmp.png"
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, png_path)
