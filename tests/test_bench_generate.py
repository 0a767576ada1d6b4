"""The generation benchmark (experiments/bench_generate.py's logic) end to end at a toy size: it runs
through the engine over a random bank view and writes the JSON and the chart; the same memory
sharded over two devices, or with its content in host memory or on disk, generates the same; bad
settings fail."""

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


def test_sharded_and_offloaded_memories_generate_the_same(tmp_path):
  stores = tmp_path / "stores"
  settings = benchmark.small_settings(memory_tokens=(4096,), doc_len=32, batches=(2,),
                                      prompt_len=12, question_len=4, new_tokens=4, repeats=1,
                                      warmup=0, devices=(1, 2),
                                      tiers=("device", "pinned_host", "tensorstore"),
                                      store_dir=str(stores))
  report = benchmark.run_and_report(settings, str(tmp_path / "out"), progress=lambda line: None)
  runs = {(r["devices"], r["tier"]): r for r in report["results"]}
  assert sorted(runs) == [(n, t) for n in (1, 2) for t in ("device", "pinned_host", "tensorstore")]
  one = runs[(1, "device")]
  assert one["status"] == "ok" and len(one["first_tokens"]) == 2
  # tiny preset: k = 2 distinct documents per request among the 4096 / 32 = 128
  assert all(len(set(docs)) == 2 and max(docs) < 128 for docs in one["routed_docs"])
  for where, r in runs.items():
    assert r["status"] == "ok", (where, r)
    assert r["first_tokens"] == one["first_tokens"], where  # exact routing, same chunks attended
    assert r["routed_docs"] == one["routed_docs"], where
    assert r["weights_bytes_per_device"] == [report["params_bytes"]] * where[0]

  # 4096 tokens / P = 4: 1024 chunks x 2 router layers x Hkv·D = 32 bf16 keys; two devices hold
  # half each
  assert one["router_key_bytes_per_device"] == [1024 * 2 * 32 * 2]
  assert runs[(2, "device")]["router_key_bytes_per_device"] == [512 * 2 * 32 * 2] * 2
  for n in (1, 2):
    device, host, disk = (runs[(n, t)] for t in ("device", "pinned_host", "tensorstore"))
    keys = device["router_key_bytes_per_device"]
    # K̄ and V̄ have the keys' shape and dtype: the host tier holds twice the key bytes per device,
    # and exactly that much leaves the device's memory
    assert host["host_bytes_per_device"] == [2 * k for k in keys]
    assert [a - b for a, b in zip(device["hbm_bytes_per_device"], host["hbm_bytes_per_device"])
            ] == host["host_bytes_per_device"]
    assert device["host_bytes_per_device"] == disk["host_bytes_per_device"] == [0] * n
    assert disk["hbm_bytes_per_device"] == host["hbm_bytes_per_device"]
    assert disk["store_bytes"] >= 2 * sum(keys) and device["store_bytes"] == 0
    # only the host tier's prefill moves the winners over a host link
    assert host["host_link_floor_s"] > 0 and device["host_link_floor_s"] is None
  # K̄ and V̄ of 2 requests x k = 2 documents x 8 chunks x 32 bf16 values x 2 router layers
  assert one["content_fetch_bytes"] == 2 * 2 * 2 * 8 * 32 * 2 * 2
  assert list(stores.iterdir()) == []  # each memory's store is removed after its run


def test_report_is_written_atomically(tmp_path, monkeypatch):
  out = tmp_path / "out"
  assert_report_write_is_atomic(benchmark, monkeypatch, str(out), str(out / "bench_generate.json"),
                                str(out / "bench_generate.png"))


@pytest.mark.parametrize("bad, match", [
    (("--small", "--new_tokens=100"), "power of two"),
    (("--small", "--memory_tokens=100", "--doc_len=1024"), "hold a document"),
    (("--small", "--batches=0"), "batches must be positive"),
    (("--small", "--tiers=device,disk"), "tiers must be distinct names"),
    (("--small", "--devices=64"), "need 64 devices"),
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
