"""The generation benchmark (experiments/bench_generate.py's logic) end to end at a toy size: it runs
through the engine over a random bank view and writes the JSON and the chart; bad settings fail."""

import json
import math

import pytest

from benchmarks import common
from benchmarks import generate as benchmark
from tests.bench_fixtures import assert_flags_refused, assert_report_write_is_atomic


def test_toy_benchmark_writes_json_and_chart(tmp_path):
  settings = benchmark.small_settings(memory_tokens=(512,), doc_len=32, batches=(1, 2),
                                      prompt_len=12, question_len=4, new_tokens=4, repeats=1,
                                      warmup=0)
  lines = []
  benchmark.run_and_report(settings, str(tmp_path), progress=lines.append)
  report = json.loads((tmp_path / "bench_generate.json").read_text())
  assert (tmp_path / "bench_generate.png").stat().st_size > 0
  assert [(r["memory_tokens"], r["batch"]) for r in report["results"]] == [(512, 1), (512, 2)]
  for r in report["results"]:
    assert r["status"] == "ok", r
    assert len(r["ttft_times_s"]) == len(r["decode_times_s"]) == 1
    for key in ("ttft_s", "decode_s", "decode_tokens_per_s", "prefill_floor_s",
                "decode_step_floor_s"):
      assert math.isfinite(r[key]) and r[key] > 0, key
    # tiny preset: 2 router layers x 512 / 4 chunks x Hkv·D = 32 bf16 keys
    assert r["router_key_bytes"] == 2 * 128 * 32 * 2
  one, two = report["results"]
  # a second request reads the same weights and keys but adds its own cache
  assert two["decode_step_floor_s"] > one["decode_step_floor_s"]
  assert two["prefill_floor_s"] >= one["prefill_floor_s"]
  # tiny preset: 2 router layers, Hkv·D = 32, P = 4; bf16 keys + bf16 content K̄ and V̄
  assert report["view_bytes_per_token"] == 2 * 32 * (2 + 2 * 2) / 4
  assert any("random view of 512 tokens" in line for line in lines)


def test_report_is_written_atomically(tmp_path, monkeypatch):
  out = tmp_path / "out"
  assert_report_write_is_atomic(benchmark, monkeypatch, str(out), str(out / "bench_generate.json"),
                                str(out / "bench_generate.png"))


@pytest.mark.parametrize("bad, match", [
    (("--small", "--new_tokens=100"), "power of two"),
    (("--small", "--memory_tokens=100", "--doc_len=1024"), "hold a document"),
    (("--small", "--batches=0"), "batches must be positive"),
])
def test_bad_flags_are_refused(tmp_path, bad, match):
  assert_flags_refused("bench_generate.py", "out", str(tmp_path / "out"), *bad, match=match)


def test_bad_settings_fail_clearly():
  with pytest.raises(common.BenchError, match="power of two"):
    benchmark.GenerateBenchSettings(new_tokens=100)
  with pytest.raises(common.BenchError, match="hold a document"):
    benchmark.GenerateBenchSettings(memory_tokens=(100,), doc_len=1024)
  with pytest.raises(common.BenchError, match="no memory sizes"):
    benchmark.GenerateBenchSettings(memory_tokens=(), fill_max=False)
