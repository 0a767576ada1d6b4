"""bench_memory's library part at tiny sizes: every part runs and the report (JSON + PNG) holds what
the lead's table needs; bad settings fail clearly."""

import json
import os

import pytest

from benchmarks import common
from benchmarks import memory as benchmark


def test_small_run_writes_json_and_chart(tmp_path):
  settings = benchmark.small_settings(memory_tokens=(512,), batches=(2,), encode_tokens=200,
                                      steps=1, warmup=0)
  lines = []
  report = benchmark.run(settings, str(tmp_path), progress=lines.append)
  saved = json.loads((tmp_path / "bench_memory.json").read_text())
  assert (tmp_path / "bench_memory.png").stat().st_size > 0
  assert saved["routing"] == json.loads(json.dumps(report["routing"]))
  assert [(r["memory_tokens"], r["batch"], r["status"]) for r in saved["routing"]] == [
      (512, 2, "ok")]
  for r in saved["routing"]:
    assert r["num_chunks"] >= r["memory_tokens"] // 4 and r["median_s"] > 0
    assert r["floor_s"] == pytest.approx(r["key_bytes_per_device"] /
                                         saved["copy_bandwidth"]["bytes_per_s"])
  assert {(r["tier"], r["status"]) for r in saved["fetch"]} == {
      ("device", "ok"), ("tensorstore", "ok"), ("pinned_host", "ok")}
  assert all(r["bytes_moved"] > 0 for r in saved["fetch"])
  encode = saved["encode"]
  assert encode["status"] == "ok" and encode["tokens"] >= 200 and encode["model_flops"] > 0
  assert "routing" in benchmark.format_table(saved) and any("encode" in s for s in lines)


def test_bad_settings_fail_clearly(tmp_path):
  with pytest.raises(common.BenchError, match="unknown tiers"):
    benchmark.MemoryBenchSettings(tiers=("disk",))
  with pytest.raises(common.BenchError, match="doc_tokens"):
    benchmark.MemoryBenchSettings(doc_tokens=(64, 8))
  with pytest.raises(common.BenchError, match="--tokenizer"):
    benchmark.MemoryBenchSettings(tokenizer=str(tmp_path / "missing.json"))


def test_default_tokenizer_is_found_from_any_working_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.path.isfile(benchmark.MemoryBenchSettings().tokenizer)
