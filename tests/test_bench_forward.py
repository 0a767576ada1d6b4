"""The forward/train benchmark (experiments/bench_forward.py's logic): a tiny end-to-end run checked
against a hand FLOP count, sizes that double, atomic JSON + PNG, OOM handling and refused flags."""

import json
import math

import pytest

from benchmarks import forward as bench
from msa_jax import config as cfglib
from tests.bench_fixtures import assert_flags_refused, assert_report_write_is_atomic


def test_tiny_benchmark_writes_json_and_chart(tmp_path):
  settings = bench.BenchSettings(preset="tiny", seq_len_mem=64, doc_len=16, seq_len_prompt=16,
                                 batch=2, steps=2, warmup=1)
  lines = []
  out = tmp_path / "bench.json"
  bench.run_and_report(settings, str(out), progress=lines.append)
  report = json.loads(out.read_text())
  assert (tmp_path / "bench.png").stat().st_size > 0
  assert set(report["results"]) == {"forward", "train"}
  assert report["workload"]["num_docs"] == 4 and report["workload"]["tokens_per_step"] == 160
  assert report["num_params"] > 0 and report["jax_version"] and report["date"]
  # hand count for this workload: 4 documents of 16 tokens, prompt 16 = template head 3 + question
  # 6 + answer 7; tiny preset E=64, F=128, L=4, H=4, Hkv=2, D=16, V=512, routers 2,3, k=2, P=4
  layer = 64 * 4 * 16 + 2 * 64 * 2 * 16 + 4 * 16 * 64 + 3 * 64 * 128
  row = (2 * 64 * (4 * layer + 2 * 64 * 32)            # memory tokens: 4 layers + router_k
         + 2 * (16 * 4 * layer + 6 * 2 * 64 * 64)       # prompt tokens + router_q on the question
         + 2 * 16 * 64 * 512                            # LM head
         + 4 * 136 * 256 * 4                            # 4 docs x 16·17/2 causal pairs x 4·H·D
         + (136 * 4 + 13 * 8 * 2) * 256                 # prompt pairs + 13 tokens x 8 chunks x 2
         + 2 * 6 * 16 * 32 * 2)                         # routing: 6 tokens x 16 chunks x 2·Hkv·D
  hand = {"forward": 2 * row, "train": 3 * 2 * row}     # batch 2; train = 3 x forward
  for mode, r in report["results"].items():
    assert r["status"] == "ok", r
    assert r["tokens_per_s"] > 0
    assert all(math.isfinite(t) and t > 0 for t in [r["compile_s"], r["step_time_s"],
                                                    *r["step_times_s"]])
    assert len(r["step_times_s"]) == 2
    assert r["model_flops_per_step"] == hand[mode]
    assert math.isfinite(r["loss"])
    if report["platform"] == "cpu":
      assert r["mfu"] is None
  assert (report["results"]["train"]["model_flops_per_step"] ==
          3 * report["results"]["forward"]["model_flops_per_step"])
  assert any("compiled" in line for line in lines) and any("step 2/2" in line for line in lines)


def test_oom_mode_is_recorded_and_the_next_mode_runs(tmp_path, monkeypatch):
  def fake_time_mode(fn, args, *, label, **kwargs):
    if label == "forward":
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0TiB.")
    return {"compile_s": 1.0, "step_times_s": [0.5, 0.25, 1.0], "loss": 1.0,
            "compiled_memory": None}

  monkeypatch.setattr(bench, "time_mode", fake_time_mode)
  settings = bench.BenchSettings(preset="tiny", seq_len_mem=32, doc_len=16, seq_len_prompt=8,
                                 batch=1, steps=3, warmup=0)
  report = bench.run_and_report(settings, str(tmp_path / "r.json"), progress=lambda _: None)
  assert report["results"]["forward"]["status"] == "OOM"
  train = report["results"]["train"]
  assert train["status"] == "ok" and train["step_time_s"] == 0.5
  assert train["tokens_per_s"] == pytest.approx((32 + 8) / 0.5)
  assert "OOM" in bench.format_table(report)
  assert (tmp_path / "r.png").exists()


def test_model_flops_hand_computed_tiny_case():
  model, msa = cfglib.preset("tiny")  # E=64, F=128, L=4, H=4, Hkv=2, D=16, V=512; routers 2,3; k=2, P=4
  work = bench.Workload(batch=2, doc_lengths=(8, 3, 8), seq_len_prompt=6, template_len=3,
                        question_len=2)
  layer = 64 * 4 * 16 + 2 * 64 * 2 * 16 + 4 * 16 * 64 + 3 * 64 * 128  # q, k, v, o, MLP = 36864
  expected_row = {
      # 19 memory tokens x (4 layers + router_k (64x32) in 2 router layers)
      "dense_memory": 2 * 19 * (4 * layer + 2 * 64 * 32),
      # 6 prompt tokens x 4 layers + router_q (64x64) on 2 question tokens in 2 router layers
      "dense_prompt": 2 * (6 * 4 * layer + 2 * 2 * 64 * 64),
      "lm_head": 2 * 6 * 64 * 512,
      # causal pairs within documents: 36 + 6 + 36, x 4·H·D = 256 per pair, x 4 layers
      "attention_memory": (36 + 6 + 36) * 256 * 4,
      # prompt causal 21 pairs x 4 layers + 3 memory-seeing tokens x 4 selected chunks (two
      # 8-token docs, 2 chunks each) x 2 router layers
      "attention_prompt": (21 * 4 + 3 * 4 * 2) * 256,
      # 2 route tokens x 5 real chunks x 2·Hkv·D (head mean) x 2 router layers
      "routing": 2 * 2 * 5 * (2 * 16) * 2,
  }
  assert sum(expected_row.values()) == 8_063_232
  forward = bench.model_flops(model, msa, work, "forward")
  train = bench.model_flops(model, msa, work, "train")
  for key, value in expected_row.items():
    assert forward[key] == 2 * value, key
    assert train[key] == 6 * value, key
  assert forward["total"] == 2 * 8_063_232 and train["total"] == 6 * 8_063_232

  coupled = bench.model_flops(model, msa.replace(decouple_router=False, head_reduce="max"), work,
                              "forward")
  assert coupled["dense_memory"] == 2 * 2 * 19 * 4 * layer  # no router projections
  assert coupled["routing"] == 2 * 2 * 2 * 5 * (4 * 16) * 2  # head max scores all H query heads


def test_peak_flops_table_and_workload():
  assert bench.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert bench.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
  assert bench.peak_bf16_flops("NVIDIA H200") == 989e12
  assert bench.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert bench.peak_bf16_flops("cpu") is None
  _, msa = cfglib.preset("msa-4b")
  work = bench.make_workload(bench.BenchSettings(seq_len_mem=16384 + 100, doc_len=1024,
                                                 seq_len_prompt=512), msa)
  assert work.doc_lengths == (1024,) * 16 + (100,) and work.question_len == 64
  with pytest.raises(bench.BenchError, match="doc_len"):
    bench.BenchSettings(seq_len_mem=64, doc_len=128)
  with pytest.raises(bench.BenchError, match="modes"):
    bench.BenchSettings(modes=("backward",))


def _flops(**changes):
  base = dict(preset="tiny", seq_len_mem=64, doc_len=16, seq_len_prompt=16, batch=2)
  settings = bench.BenchSettings(**(base | changes))
  model, msa = bench.model_configs(settings)
  return bench.model_flops(model, msa, bench.make_workload(settings, msa), "forward")


def test_model_flops_scale_the_right_way_when_a_size_doubles():
  base = _flops()
  assert _flops(batch=4) == {k: 2 * v for k, v in base.items()}
  # twice the documents: the memory stream's work and the routing double, the prompt's does not
  more_docs = _flops(seq_len_mem=128)
  for key in ("dense_memory", "attention_memory", "routing"):
    assert more_docs[key] == 2 * base[key], key
  for key in ("dense_prompt", "lm_head", "attention_prompt"):
    assert more_docs[key] == base[key], key
  # the same memory in documents twice as long: dense work and chunk count stay, causal pairs per
  # token grow (16·17/2 x 4 -> 32·33/2 x 2), and the top-k documents bring twice the chunks
  longer_docs = _flops(doc_len=32)
  for key in ("dense_memory", "dense_prompt", "lm_head", "routing"):
    assert longer_docs[key] == base[key], key
  assert longer_docs["attention_memory"] == base["attention_memory"] * (2 * 528) // (4 * 136)
  assert longer_docs["attention_prompt"] > base["attention_prompt"]


def test_report_is_written_atomically(tmp_path, monkeypatch):
  out = tmp_path / "out" / "bench.json"
  assert_report_write_is_atomic(bench, monkeypatch, str(out), str(out), str(tmp_path / "out" /
                                                                            "bench.png"))


@pytest.mark.parametrize("bad, match", [
    (("--seq_len_mem=64", "--doc_len=128"), "doc_len"),
    (("--modes=backward",), "modes"),
    (("--batch=0",), "batch must be positive"),
    (("stray",), "unexpected arguments"),
])
def test_bad_flags_are_refused(tmp_path, bad, match):
  assert_flags_refused("bench_forward.py", "output", str(tmp_path / "r.json"), *bad, match=match)
