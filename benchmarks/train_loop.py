"""Where a training step's time goes: the input pipeline, the device step, and the two together.

`run(settings)` takes a training config (`experiments/train.py`'s JSON and `--set` overrides) and
measures, in one process, side by side:

  pipeline   batches/s the config's grain pipeline delivers alone, at each worker count asked for
  device     the jitted train step on one batch already on the device, back to back (the floor
             the pipeline would have to beat)
  loop       the trainer's loop: next batch, host->device, step (what a run sees); a step on a
             bucket shape not compiled yet is left out of the mean and counted (`loop_compiles`)

and, with `profile_dir`, a `jax.profiler` trace of a few device steps whose device events are summed
by op name (the top ones go in the report), so the report says what bounds a step without opening a
profiler UI. The step is the trainer's own (`make_train_step`), on the model the config builds.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import statistics
import time
from collections import defaultdict
from typing import Any

import jax
import numpy as np

from msa_jax.atomic_dir import write_json_and_chart
from msa_jax.sharding import make_mesh
from msa_jax.training import data_setup
from msa_jax.training import optimizer as optlib
from msa_jax.training.model_setup import build_model, model_configs
from msa_jax.training.train_config import load_train_config
from msa_jax.training.train_step import init_state, make_train_step, shardings_of
from msa_jax.training.trainer import to_global_batch, phase_loss_weights, resolve_mesh_shape


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  config: str
  overrides: tuple[str, ...] = ()
  phase: int = 0
  worker_counts: tuple[int, ...] = (0,)
  steps: int = 20
  profile_dir: str | None = None
  profile_steps: int = 5
  top_ops: int = 25


def _shapes(host_batch) -> tuple:
  """The batch's array shapes: a new combination of buckets means a new compilation."""
  return tuple(np.shape(x) for x in jax.tree.leaves(host_batch))


def _median_interval(times: list[float]) -> float:
  return statistics.median(np.diff(times)) if len(times) > 1 else float("nan")


def _pipeline_rate(cfg, phase_index: int, msa, tokenizer, workers: int, steps: int) -> dict:
  data = dataclasses.replace(cfg.data, worker_count=workers)
  batches = data_setup.data_for_phase(data, cfg.phases, msa, tokenizer)(phase_index)
  next(batches)  # workers started, first batch built
  start = time.perf_counter()
  for _ in range(steps):
    next(batches)
  per_batch = (time.perf_counter() - start) / steps
  return {"workers": workers, "batch_s": per_batch, "batches_per_s": 1 / per_batch,
          "samples_per_s": cfg.data.batch_size / per_batch}


def summarize_trace(trace_dir: str, top: int) -> dict[str, Any]:
  """Device time by op name from the newest perfetto trace under `trace_dir` (`ph: X` events of
  processes whose name mentions a GPU/TPU device), with the share of the traced wall span."""
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    return {"error": f"no *.trace.json.gz under {trace_dir}"}
  with gzip.open(files[-1], "rt") as f:
    events = json.load(f)["traceEvents"]
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {pid for pid, n in names.items()
                 if any(s in n.lower() for s in ("/device:gpu", "/device:tpu", "stream"))}
  by_op: dict[str, float] = defaultdict(float)
  count: dict[str, int] = defaultdict(int)
  start, end = float("inf"), 0.0
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in device_pids:
      continue
    by_op[e["name"]] += e.get("dur", 0.0)
    count[e["name"]] += 1
    start, end = min(start, e["ts"]), max(end, e["ts"] + e.get("dur", 0.0))
  busy = sum(by_op.values())
  ranked = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
  return {"trace_file": files[-1], "device_events": sum(count.values()),
          "device_busy_us": busy, "device_span_us": max(end - start, 0.0),
          "top_ops": [{"name": n, "total_us": t, "calls": count[n], "share": t / busy if busy else 0}
                      for n, t in ranked]}


def run(settings: LoopSettings, printer=print) -> dict[str, Any]:
  cfg = load_train_config(settings.config, list(settings.overrides))
  phase = cfg.phases[settings.phase]
  tokenizer = data_setup.load_tokenizer(cfg.data)
  _, msa = model_configs(cfg.model, tokenizer.vocab_size)
  mesh = make_mesh(resolve_mesh_shape(cfg.mesh, jax.device_count()))
  report: dict[str, Any] = {"settings": dataclasses.asdict(settings),
                            "device": jax.devices()[0].device_kind,
                            "device_count": jax.device_count(), "batch_size": cfg.data.batch_size,
                            "memory_tokens": phase.memory_tokens}

  report["pipeline"] = []
  for workers in settings.worker_counts:
    row = _pipeline_rate(cfg, settings.phase, msa, tokenizer, workers, settings.steps)
    printer(f"pipeline, {workers} workers: {row['batch_s'] * 1e3:.1f} ms/batch, "
            f"{row['samples_per_s']:.0f} samples/s")
    report["pipeline"].append(row)

  built = build_model(cfg.model, mesh, seed=cfg.seed, vocab_size=tokenizer.vocab_size)
  tx = optlib.make_optimizer(phase, cfg.optimizer, built.params)
  state = init_state(built.params, tx, mesh)
  step = make_train_step(built.model, tx, mesh, weights=phase_loss_weights(phase, built.model.msa),
                         ce_chunk_size=cfg.ce_chunk_size, state_shardings=shardings_of(state))
  data = dataclasses.replace(cfg.data, worker_count=max(settings.worker_counts))
  batches = data_setup.data_for_phase(data, cfg.phases, msa, tokenizer)(settings.phase)
  host_batch = next(batches)
  device_batch = to_global_batch(host_batch, mesh)
  t0 = time.perf_counter()
  state, metrics = step(state, *device_batch)
  jax.block_until_ready(metrics)
  report["first_step_s"] = time.perf_counter() - t0  # compile + one step
  report["prompt_shape"] = list(np.shape(host_batch[1].tokens))
  report["memory_shape"] = list(np.shape(host_batch[0].tokens))

  stamps = [time.perf_counter()]
  for _ in range(settings.steps):
    state, metrics = step(state, *device_batch)
    jax.block_until_ready(metrics)
    stamps.append(time.perf_counter())
  report["device_step_s"] = _median_interval(stamps)

  seen = {_shapes(host_batch)}
  loop_s, timed, compiles = 0.0, 0, 0
  start = time.perf_counter()
  for _ in range(settings.steps):
    host_batch = next(batches)
    if _shapes(host_batch) in seen:
      state, metrics = step(state, *to_global_batch(host_batch, mesh))
      timed += 1
      continue
    # a bucket shape not compiled yet: its step compiles, which a long run pays once, so it is
    # timed apart (the device is drained before and after it)
    jax.block_until_ready(metrics)
    loop_s += time.perf_counter() - start
    state, metrics = step(state, *to_global_batch(host_batch, mesh))
    jax.block_until_ready(metrics)
    seen.add(_shapes(host_batch))
    compiles += 1
    start = time.perf_counter()
  jax.block_until_ready(metrics)
  loop_s += time.perf_counter() - start
  report["loop_step_s"] = loop_s / timed if timed else float("nan")
  report["loop_steps_timed"], report["loop_compiles"] = timed, compiles
  report["batch_shapes_seen"] = len(seen)
  printer(f"device step {report['device_step_s'] * 1e3:.1f} ms (resident batch), loop "
          f"{report['loop_step_s'] * 1e3:.1f} ms/step over {timed} steps ({compiles} new bucket "
          f"shapes compiled, not timed), first step {report['first_step_s']:.1f} s")

  if settings.profile_dir:
    with jax.profiler.trace(settings.profile_dir, create_perfetto_trace=True):
      for _ in range(settings.profile_steps):
        state, metrics = step(state, *device_batch)
      jax.block_until_ready(metrics)
    report["profile"] = summarize_trace(settings.profile_dir, settings.top_ops)
    for op in report["profile"].get("top_ops", [])[:10]:
      printer(f"  {op['share'] * 100:5.1f}%  {op['total_us'] / settings.profile_steps:9.1f} us/step"
              f"  x{op['calls'] // settings.profile_steps:<4d} {op['name'][:90]}")
  return report


def write_chart(report: dict[str, Any], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels = [f"pipeline\n{r['workers']} workers" for r in report["pipeline"]]
  values = [r["batch_s"] * 1e3 for r in report["pipeline"]]
  labels += ["device step\n(resident batch)", "training loop"]
  values += [report["device_step_s"] * 1e3, report["loop_step_s"] * 1e3]
  fig, ax = plt.subplots(figsize=(7, 3.5))
  ax.barh(labels, values, color=["#999"] * len(report["pipeline"]) + ["#1f77b4", "#d62728"])
  ax.set_xlabel("ms per batch / step")
  ax.set_title(f"{report['device']}: batch {report['batch_size']}, "
               f"{report['memory_tokens']} memory tokens")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run_and_write(settings: LoopSettings, output: str | None) -> dict[str, Any]:
  report = run(settings)
  if output:
    write_json_and_chart(report, output, os.path.splitext(output)[0] + ".png", write_chart)
  return report
