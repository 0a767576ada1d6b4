"""bench_memory's library part at tiny sizes: every part runs and the report (JSON + PNG) holds what
the lead's table needs; bad settings fail clearly."""

import json
import os

import pytest

from benchmarks import common
from benchmarks import memory as benchmark
from tests.bench_fixtures import assert_flags_refused, assert_report_write_is_atomic


def test_small_run_writes_json_and_chart(tmp_path):
  settings = benchmark.small_settings(memory_tokens=(512,), batches=(1, 2), encode_tokens=200,
                                      doc_tokens=(8, 8), steps=1, warmup=0)
  lines = []
  report = benchmark.run(settings, str(tmp_path), progress=lines.append)
  saved = json.loads((tmp_path / "bench_memory.json").read_text())
  assert (tmp_path / "bench_memory.png").stat().st_size > 0
  assert saved["routing"] == json.loads(json.dumps(report["routing"]))
  assert [(r["memory_tokens"], r["batch"], r["status"]) for r in saved["routing"]] == [
      (512, 1, "ok"), (512, 2, "ok")]
  for r in saved["routing"]:
    # 512 tokens in documents of 8: 64 documents of 2 chunks (P = 4)
    assert (r["num_docs"], r["num_chunks"], r["shards"]) == (64, 128, 8) and r["median_s"] > 0
    # every device holds whole rows of Hkv·D = 32 bf16 keys, and together they hold all 128
    assert r["key_bytes_per_device"] % (32 * 2) == 0
    assert r["shards"] * r["key_bytes_per_device"] >= 128 * 32 * 2
    assert r["floor_s"] > 0 and r["compute_floor_s"] > 0
  one, two = saved["routing"]
  # the key stream does not depend on the batch; the score work is linear in it
  assert one["floor_s"] == two["floor_s"]
  assert two["score_flops_per_device"] == 2 * one["score_flops_per_device"]
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


def test_report_is_written_atomically(tmp_path, monkeypatch):
  out = tmp_path / "out"
  assert_report_write_is_atomic(benchmark, monkeypatch, str(out), str(out / "bench_memory.json"),
                                str(out / "bench_memory.png"))


@pytest.mark.parametrize("bad, match", [
    (("--small", "--tiers=disk"), "unknown tiers"),
    (("--small", "--tokenizer=/nonexistent/tokenizer.json"), "--tokenizer"),
    (("--small", "--steps=0"), "steps must be positive"),
])
def test_bad_flags_are_refused(tmp_path, bad, match):
  assert_flags_refused("bench_memory.py", "out", str(tmp_path / "out"), *bad, match=match)


def test_default_tokenizer_is_found_from_any_working_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.path.isfile(benchmark.MemoryBenchSettings().tokenizer)
