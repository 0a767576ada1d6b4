"""Generation benchmark: time to first token and decode tokens/s through the engine, over a memory
bank view filled directly with random pooled keys/values at the model's shapes (no encoding).

For each memory size (tokens; documents of `doc_len` tokens, so `doc_len / P` chunks each) and batch
size, with random weights:
  TTFT     `Engine.prefill` of B requests (host batch building, stage 2 with routing over the whole
           memory in every router layer, the gather of the winners' chunks, attention, the first
           logits, the routing returned to the host), median over `repeats` after a warm-up;
  decode   `Engine.decode` of `new_tokens` tokens per row (one on-device loop; no stop ids, so
           every row runs the whole budget): B·new_tokens / time.

The view is `msa_jax.memory.bank_view.view_from_arrays` on a one-device `memory` mesh, the content
in device memory: the serving path of a bank that fits one accelerator. Router keys are random unit
vectors (what `router_keys.prepare` makes of cosine-mode keys) in bfloat16, the default key dtype;
content random normals in the model's dtype.

Floors (METHOD.md: the larger of bytes / bandwidth and FLOPs / peak): a decode step must read the
weights and every cache entry once; a prefill must read the weights and every router key once. The
bandwidth is measured here with a large device copy.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks import common, forward
from benchmarks.memory import copy_bandwidth
from msa_jax.atomic_dir import write_json_and_chart
from msa_jax.inference.engine import Engine
from msa_jax.inference.requests import Request, SamplingConfig
from msa_jax.memory import bank_view, routing
from msa_jax.model.model import MSAForCausalLM
from msa_jax.model.router_keys import DEFAULT_KEY_DTYPE
from msa_jax.sharding import make_mesh


_KEY_DTYPE = jnp.dtype(DEFAULT_KEY_DTYPE)


@dataclasses.dataclass(frozen=True)
class GenerateBenchSettings:
  """What to benchmark (the binary's flags). `fill_max` adds the largest memory that fits the free
  device memory (estimated, then shrunk on OOM)."""

  preset: str = "msa-4b"
  memory_tokens: tuple[int, ...] = (1_000_000, 10_000_000)
  fill_max: bool = True
  doc_len: int = 1024
  batches: tuple[int, ...] = (1, 16)
  prompt_len: int = 128
  question_len: int = 64
  new_tokens: int = 128
  repeats: int = 5
  warmup: int = 1
  max_fraction: float = 0.85  # of free device memory the memory view may take
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "memory_tokens", tuple(int(t) for t in self.memory_tokens))
    object.__setattr__(self, "batches", tuple(int(b) for b in self.batches))
    for name in ("doc_len", "prompt_len", "question_len", "new_tokens", "repeats"):
      if getattr(self, name) <= 0:
        raise common.BenchError(f"{name} must be positive, got {getattr(self, name)}")
    if not self.batches or min(self.batches) <= 0:
      raise common.BenchError(f"batches must be positive, got {self.batches}")
    if not self.memory_tokens and not self.fill_max:
      raise common.BenchError("no memory sizes: give memory_tokens or fill_max")
    if any(t < self.doc_len for t in self.memory_tokens):
      raise common.BenchError(f"every memory size must hold a document of {self.doc_len} "
                              f"tokens, got {self.memory_tokens}")
    if self.new_tokens & (self.new_tokens - 1):
      raise common.BenchError(f"new_tokens must be a power of two (the engine's bucket), "
                              f"got {self.new_tokens}")
    if not 0 < self.max_fraction <= 1:
      raise common.BenchError(f"max_fraction must be in (0, 1], got {self.max_fraction}")


# --------------------------------------------------------------------------- the random memory


def view_bytes_per_token(model, msa) -> float:
  """Device bytes of a bank view per memory token: bf16 router keys, content K̄ and V̄."""
  row = model.num_kv_heads * model.head_dim
  content = jnp.dtype(model.param_dtype).itemsize
  return len(msa.router_layers) * row * (_KEY_DTYPE.itemsize + 2 * content) / msa.chunk_size


def random_view(model, msa, memory_tokens: int, doc_len: int, seed: int):
  """A bank view over `memory_tokens // doc_len` documents of `doc_len` tokens, every array made on
  the device one router layer at a time (peak: the view plus one layer)."""
  chunks_per_doc = -(-doc_len // msa.chunk_size)
  num_docs = memory_tokens // doc_len
  plan = routing.plan_shards(np.arange(num_docs + 1) * chunks_per_doc, 1)
  mesh = make_mesh((1,), (routing.MEMORY_AXIS,), devices=jax.devices()[:1])
  shape = (len(msa.router_layers), plan.slots_per_shard, model.num_kv_heads, model.head_dim)
  sharding = NamedSharding(mesh, P(None, routing.MEMORY_AXIS))

  def fill(key, dtype, unit: bool):
    def layer(r, buf):
      x = jax.random.normal(jax.random.fold_in(key, r), shape[1:], jnp.float32)
      if unit:
        x = x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True))
      return jax.lax.dynamic_update_index_in_dim(buf, x.astype(dtype), r, 0)
    return jax.lax.fori_loop(0, shape[0], layer, jnp.zeros(shape, dtype))

  make = jax.jit(fill, static_argnums=(1, 2), out_shardings=sharding)
  key = jax.random.key(seed)
  content_dtype = jnp.dtype(model.param_dtype)
  keys = make(jax.random.fold_in(key, 0), _KEY_DTYPE, True)
  content_k = make(jax.random.fold_in(key, 1), content_dtype, False)
  content_v = make(jax.random.fold_in(key, 2), content_dtype, False)
  view = bank_view.view_from_arrays(plan, mesh, msa.router_layers, keys, content_k, content_v,
                                    tier="device", coupled=not msa.decouple_router)
  return view, num_docs * doc_len


def max_memory_tokens(model, msa, params_bytes: int, settings: GenerateBenchSettings) -> int | None:
  """The largest memory (whole documents) whose view fits `max_fraction` of the free device memory
  left after the weights; None where the backend does not report its memory (CPU)."""
  stats = common.memory_stats(jax.devices()[0])
  if not stats or "bytes_limit" not in stats:
    return None
  free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  tokens = int(free * settings.max_fraction / view_bytes_per_token(model, msa))
  return tokens // settings.doc_len * settings.doc_len


# --------------------------------------------------------------------------- timing


def random_requests(rng: np.random.Generator, vocab: int, msa, batch: int, settings
                    ) -> list[Request]:
  head = msa.template_len
  question = min(settings.question_len, settings.prompt_len - head)
  out = []
  for _ in range(batch):
    tokens = rng.integers(5, vocab, settings.prompt_len).tolist()
    route = [False] * head + [True] * question + [False] * (settings.prompt_len - head - question)
    out.append(Request(tokens=tokens, route_mask=route, max_new_tokens=settings.new_tokens))
  return out


def time_generation(engine: Engine, requests, settings: GenerateBenchSettings,
                    progress: Callable[[str], None], label: str) -> dict[str, Any]:
  """Warm-up (compiles), then `repeats` × (prefill timed, decode timed)."""
  ttft, decode = [], []
  greedy = SamplingConfig()
  for i in range(settings.warmup + settings.repeats):
    t0 = time.perf_counter()
    state, _ = engine.prefill(requests)
    jax.block_until_ready(state.logits)
    t1 = time.perf_counter()
    tokens, _, state = engine.decode(state, requests, greedy)
    jax.block_until_ready(state.logits)
    t2 = time.perf_counter()
    del state
    if any(len(t) != settings.new_tokens for t in tokens):
      raise RuntimeError(f"decode produced {[len(t) for t in tokens]} tokens, expected "
                         f"{settings.new_tokens} per row")
    kind = "warm-up" if i < settings.warmup else "timed"
    if i >= settings.warmup:
      ttft.append(t1 - t0)
      decode.append(t2 - t1)
    rate = len(requests) * settings.new_tokens / (t2 - t1)
    progress(f"[{label}] {kind} {i + 1}/{settings.warmup + settings.repeats}: TTFT "
             f"{(t1 - t0) * 1e3:.1f} ms, decode {rate:.1f} tokens/s")
  b = len(requests)
  ttft_s, decode_s = statistics.median(ttft), statistics.median(decode)
  return {"status": "ok", "ttft_s": ttft_s, "ttft_times_s": ttft, "decode_s": decode_s,
          "decode_times_s": decode, "decode_tokens_per_s": b * settings.new_tokens / decode_s,
          "decode_step_s": decode_s / max(1, settings.new_tokens - 1)}


def _floors(model, msa, params_bytes, memory_tokens, batch, settings, bandwidth, peak):
  """Lower bounds (s): prefill reads the weights and every router key; does 2·N FLOPs per token
  plus the routing scores; a decode step reads the weights and the cache."""
  chunks = memory_tokens / msa.chunk_size
  row = model.num_kv_heads * model.head_dim
  routers = len(msa.router_layers)
  key_bytes = routers * chunks * row * _KEY_DTYPE.itemsize
  params = params_bytes / jnp.dtype(model.param_dtype).itemsize
  flops = (2 * params * batch * settings.prompt_len +
           2 * batch * settings.question_len * chunks * row * routers)
  prefill = max((params_bytes + key_bytes) / bandwidth, flops / peak if peak else 0.0)
  selected = msa.top_k_docs * -(-settings.doc_len // msa.chunk_size)
  slots = settings.prompt_len + settings.new_tokens
  cache = 2 * batch * row * jnp.dtype(model.compute_dtype).itemsize * (
      model.num_layers * slots + routers * selected)
  return {"prefill_floor_s": prefill, "decode_step_floor_s": (params_bytes + cache) / bandwidth,
          "router_key_bytes": key_bytes}


# --------------------------------------------------------------------------- the benchmark


def _print(line: str) -> None:
  print(line, flush=True)


def run_benchmark(settings: GenerateBenchSettings,
                  progress: Callable[[str], None] = _print) -> dict[str, Any]:
  model_cfg, msa_cfg = forward.model_configs(
      forward.BenchSettings(preset=settings.preset, param_dtype="bfloat16"))
  if settings.prompt_len <= msa_cfg.template_len:
    raise common.BenchError(f"prompt_len must exceed the template head "
                            f"({msa_cfg.template_len})")
  model = MSAForCausalLM(model_cfg, msa_cfg)
  device = jax.devices()[0]
  params, _ = forward.init_params(model, settings.seed)
  params_bytes = common.tree_bytes(params)
  bandwidth = copy_bandwidth(min(2 << 30, max(1 << 24, params_bytes)), steps=10,
                             warmup=2)["bytes_per_s"]
  peak = common.peak_bf16_flops(device.device_kind)
  progress(f"{settings.preset}: {common.count_params(params) / 1e9:.3f}B params on "
           f"{device.device_kind}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
  report = {
      "benchmark": "generate", "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "jax_version": jax.__version__, "platform": device.platform,
      "device_kind": device.device_kind, "num_params": common.count_params(params),
      "params_bytes": params_bytes, "copy_bandwidth_bytes_per_s": bandwidth,
      "peak_bf16_flops": peak, "flags": dataclasses.asdict(settings),
      "view_bytes_per_token": view_bytes_per_token(model_cfg, msa_cfg), "results": []}
  largest = None
  if settings.fill_max:
    largest = max_memory_tokens(model_cfg, msa_cfg, params_bytes, settings)
    if largest is None:
      progress("the backend reports no device memory: no largest-memory run")
    elif largest < settings.doc_len or any(largest <= t for t in settings.memory_tokens):
      largest = None
  rng = np.random.default_rng(settings.seed)
  run = lambda tokens: _one_memory(model, params, params_bytes, tokens, settings, rng, bandwidth,
                                   peak, progress)
  for tokens in settings.memory_tokens:
    report["results"].extend(run(tokens))
  for _ in range(3 if largest else 0):  # the largest memory shrinks until it fits
    entry = run(largest)
    report["results"].extend(entry)
    if not any(r["status"] == "OOM" for r in entry):
      break
    largest = int(largest * 0.7) // settings.doc_len * settings.doc_len
  return report


def _one_memory(model, params, params_bytes, tokens, settings, rng, bandwidth, peak, progress):
  """All batch sizes over one memory; an OOM (building the view or running) is recorded."""
  c, m = model.config, model.msa
  label = f"memory {tokens / 1e6:.3g}M"
  out = []
  view = None
  try:
    t0 = time.perf_counter()
    view, tokens = random_view(c, m, tokens, settings.doc_len, settings.seed)
    jax.block_until_ready(view.layers.router_keys)
    progress(f"[{label}] random view of {tokens} tokens built in {time.perf_counter() - t0:.1f} s")
    engine = Engine(model, params, view, max_batch=max(settings.batches))
    for batch in settings.batches:
      entry = {"memory_tokens": tokens, "batch": batch,
               **_floors(c, m, params_bytes, tokens, batch, settings, bandwidth, peak)}
      try:
        entry.update(time_generation(engine, random_requests(rng, c.vocab_size, m, batch, settings),
                                     settings, progress, f"{label} batch {batch}"))
      except Exception as e:  # noqa: BLE001 - an OOM is a result; anything else is re-raised
        if not common.is_oom(e):
          raise
        entry.update(status="OOM", error=str(e).splitlines()[0][:300])
      stats = common.memory_stats(jax.devices()[0])
      entry["peak_bytes_in_use"] = stats.get("peak_bytes_in_use") if stats else None
      out.append(entry)
      if entry["status"] == "ok":
        progress(f"[{label} batch {batch}] TTFT {entry['ttft_s'] * 1e3:.1f} ms (floor "
                 f"{entry['prefill_floor_s'] * 1e3:.2f}), decode {entry['decode_tokens_per_s']:.1f}"
                 f" tokens/s ({entry['decode_step_s'] * 1e3:.2f} ms/step, floor "
                 f"{entry['decode_step_floor_s'] * 1e3:.2f})")
  except Exception as e:  # noqa: BLE001
    if not common.is_oom(e):
      raise
    out = [{"memory_tokens": tokens, "batch": b, "status": "OOM",
            "error": str(e).splitlines()[0][:300]} for b in settings.batches]
    progress(f"[{label}] OOM")
  finally:
    del view
    gc.collect()
  return out


# --------------------------------------------------------------------------- output


def format_table(report: dict[str, Any]) -> str:
  head = ("memory tokens", "batch", "status", "TTFT ms", "floor ms", "decode tok/s", "ms/step",
          "floor ms/step", "peak mem")
  rows = [head]
  for r in report["results"]:
    peak = r.get("peak_bytes_in_use")
    mem = "n/a" if peak is None else f"{peak / 2**30:.1f} GiB"
    if r["status"] != "ok":
      rows.append((f"{r['memory_tokens']:,}", str(r["batch"]), r["status"]) + ("-",) * 5 + (mem,))
      continue
    rows.append((f"{r['memory_tokens']:,}", str(r["batch"]), "ok", f"{r['ttft_s'] * 1e3:.1f}",
                 f"{r['prefill_floor_s'] * 1e3:.2f}", f"{r['decode_tokens_per_s']:.1f}",
                 f"{r['decode_step_s'] * 1e3:.2f}", f"{r['decode_step_floor_s'] * 1e3:.2f}", mem))
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  f = report["flags"]
  title = (f"MSA generation, {f['preset']} (random weights) on {report['device_kind']} (jax "
           f"{report['jax_version']}): prompt {f['prompt_len']} ({f['question_len']} routing), "
           f"{f['new_tokens']} new tokens, documents of {f['doc_len']} tokens")
  return "\n".join([title] + lines)


def write_chart(report: dict[str, Any], path: str) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, (ax_ttft, ax_dec) = plt.subplots(1, 2, figsize=(10, 4))
  for batch in report["flags"]["batches"]:
    ok = [r for r in report["results"] if r["batch"] == batch and r["status"] == "ok"]
    tokens = [r["memory_tokens"] for r in ok]
    ax_ttft.plot(tokens, [r["ttft_s"] * 1e3 for r in ok], "o-", label=f"batch {batch}")
    ax_dec.plot(tokens, [r["decode_tokens_per_s"] for r in ok], "o-", label=f"batch {batch}")
  for ax, ylabel in ((ax_ttft, "time to first token (ms)"), (ax_dec, "decode tokens/s")):
    ax.set_xscale("log")
    ax.set_xlabel("memory tokens")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
  f = report["flags"]
  fig.suptitle(f"MSA generation, {f['preset']} on {report['device_kind']}: prompt "
               f"{f['prompt_len']}, {f['new_tokens']} new tokens", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_report(report: dict[str, Any], out_dir: str) -> tuple[str, str]:
  """bench_generate.json and bench_generate.png in `out_dir`."""
  return write_json_and_chart(report, os.path.join(out_dir, "bench_generate.json"),
                              os.path.join(out_dir, "bench_generate.png"), write_chart)


def small_settings(**overrides) -> GenerateBenchSettings:
  """Tiny sizes that run on a CPU in about a minute (the binary's --small)."""
  values = dict(preset="tiny", memory_tokens=(4096, 32768), fill_max=False, doc_len=64,
                batches=(1, 4), prompt_len=32, question_len=16, new_tokens=16, repeats=2)
  values.update(overrides)
  return GenerateBenchSettings(**values)


def run_and_report(settings: GenerateBenchSettings, out_dir: str | None,
                   progress: Callable[[str], None] = _print) -> dict[str, Any]:
  report = run_benchmark(settings, progress)
  print(format_table(report), flush=True)
  if out_dir:
    paths = write_report(report, out_dir)
    progress(f"wrote {paths[0]} and {paths[1]}")
  return report

