"""benchmarks/train_loop.py: the trace summary sums device events by op name (a hand-written
perfetto trace is the oracle), ignoring host events."""

import gzip
import json
import os

from benchmarks import train_loop


def _write_trace(directory):
  events = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
      {"ph": "X", "pid": 1, "name": "fusion_a", "ts": 100.0, "dur": 30.0},
      {"ph": "X", "pid": 1, "name": "gemm_b", "ts": 140.0, "dur": 50.0},
      {"ph": "X", "pid": 1, "name": "fusion_a", "ts": 200.0, "dur": 20.0},
      {"ph": "X", "pid": 2, "name": "host_only", "ts": 0.0, "dur": 1000.0},
  ]
  path = os.path.join(directory, "plugins", "profile", "run", "host.trace.json.gz")
  os.makedirs(os.path.dirname(path))
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)


def test_trace_summary_sums_device_ops(tmp_path):
  _write_trace(str(tmp_path))
  summary = train_loop.summarize_trace(str(tmp_path), top=5)
  assert summary["device_events"] == 3
  assert summary["device_busy_us"] == 100.0
  assert summary["device_span_us"] == 120.0  # 100 .. 220
  ops = {op["name"]: op for op in summary["top_ops"]}
  assert list(ops) == ["fusion_a", "gemm_b"]  # by total time; host events left out
  assert ops["fusion_a"]["total_us"] == 50.0 and ops["fusion_a"]["calls"] == 2
  assert abs(ops["gemm_b"]["share"] - 0.5) < 1e-12


def test_trace_summary_says_when_there_is_no_trace(tmp_path):
  assert "no *.trace.json.gz" in train_loop.summarize_trace(str(tmp_path), top=5)["error"]


def test_loop_times_compiled_shapes_and_counts_new_ones():
  """The smoke config's two prompt buckets give the loop batches of a shape not yet
  compiled: each is counted, not timed, and every other step is timed. (256-token memories and 4
  steps keep it small: the first batch takes the 192-token bucket, the loop's first the 384 one.)"""
  config = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs",
                        "tiny_synthetic_smoke.json")
  report = train_loop.run(train_loop.LoopSettings(config, overrides=("phases.0.memory_tokens=256",),
                                                  steps=4),
                          printer=lambda *_: None)
  assert report["memory_tokens"] == 256
  assert report["loop_steps_timed"] + report["loop_compiles"] == 4
  assert report["loop_compiles"] == report["batch_shapes_seen"] - 1
  assert report["loop_compiles"] >= 1  # seed 0 draws both prompt buckets
  assert 0 < report["device_step_s"] and 0 < report["loop_step_s"]
  assert report["pipeline"][0]["workers"] == 0 and report["pipeline"][0]["batch_s"] > 0
