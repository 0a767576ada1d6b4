"""Memory-bank benchmark (experiments/bench_memory.py): routing time against its bandwidth floor,
fetch time per content tier, and encode throughput.

  routing   one router layer's exact sharded top-k (`routing.route_sharded`, by `routing_kernel`)
            over banks of 1M, 10M and 100M memory tokens (router keys drawn at random directly on
            the devices at the model's shape, in `key_dtype`: no encoding), for query batches 1 and
            16. The floor is the router-key bytes one device streams (its shard, with int8 scales)
            over the copy bandwidth measured in the same run (x -> x + 1 over a large buffer, bytes
            read plus written). With many queries the score matmul, not the key bytes, bounds it:
            its FLOPs over the matmul rate measured in the same run in the matmul's operand dtype
            (`router_keys.query_dtype`) are reported too (compute_floor_s).
  fetch     gathering the chunks of k selected documents per request for one layer from each tier:
            device, pinned_host (random content of the model's shape and dtype) and tensorstore (the
            bank the encode step wrote, read through `Bank.read_rows`).
  encode    `msa_jax.memory.encode.encode_corpus` of a random-text corpus with random weights:
            tokens/s and MFU (model FLOPs of the memory stream as `forward.model_flops` counts
            them, over the time after the first batch, which includes compilation).

A size or tier that does not fit is recorded as "OOM" and the rest still runs. Timing: each program
is compiled ahead of time, run `warmup` times, then `steps` times with `block_until_ready`; the
median is reported.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import math
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks import common, forward
from msa_jax import config as cfglib
from msa_jax.atomic_dir import write_json_and_chart
from msa_jax.memory import routing, tiers
from msa_jax.memory.routing import MEMORY_AXIS
from msa_jax.model import router_keys

_WORDS = ("alpha beta gamma delta river stone cloud fire water moon north south light shadow "
          "garden tower bridge market winter summer").split()


@dataclasses.dataclass(frozen=True)
class MemoryBenchSettings:
  preset: str = "msa-4b"
  memory_tokens: tuple[int, ...] = (1_000_000, 10_000_000, 100_000_000)
  batches: tuple[int, ...] = (1, 16)
  route_tokens: int = 64  # router-query tokens per request (the question)
  key_dtype: str = router_keys.DEFAULT_KEY_DTYPE
  routing_kernel: str = "auto"  # `msa_jax.kernels.routing.api.IMPLEMENTATIONS`
  doc_tokens: tuple[int, int] = (256, 4096)  # document lengths, uniform in [min, max]
  fetch_memory_tokens: int = 10_000_000
  tiers: tuple[str, ...] = tiers.TIERS
  encode_preset: str = "msa-4b"
  encode_tokens: int = 262_144
  encode_row_tokens: int = 8192
  encode_batch_rows: int = 4
  copy_bytes: int = 2 << 30
  matmul_size: int = 8192
  steps: int = 20
  warmup: int = 3
  seed: int = 0
  # the encode part's tokenizer (any will do: the corpus is random words)
  tokenizer: str = dataclasses.field(
      default_factory=lambda: common.repo_file("models", "tiny_msa", "tokenizer.json"))

  def __post_init__(self):
    for name in ("memory_tokens", "batches", "tiers"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if self.key_dtype not in router_keys.KEY_DTYPES:
      raise common.BenchError(f"key_dtype must be one of {router_keys.KEY_DTYPES}, got "
                              f"{self.key_dtype!r}")
    bad = [t for t in self.tiers if t not in tiers.TIERS]
    if bad:
      raise common.BenchError(f"unknown tiers {bad}; expected some of {tiers.TIERS}")
    low, high = self.doc_tokens
    if not 0 < low <= high:
      raise common.BenchError(f"doc_tokens must be 0 < min <= max, got {self.doc_tokens}")
    for name in ("route_tokens", "fetch_memory_tokens", "encode_tokens", "encode_row_tokens",
                 "encode_batch_rows", "copy_bytes", "matmul_size", "steps"):
      if getattr(self, name) <= 0:
        raise common.BenchError(f"{name} must be positive, got {getattr(self, name)}")
    if not self.memory_tokens or min(self.memory_tokens) <= 0 or not self.batches:
      raise common.BenchError("memory_tokens and batches must be non-empty and positive")
    common.require_file(self.tokenizer, "tokenizer")  # up front, not after the routing part


def small_settings(**overrides) -> MemoryBenchSettings:
  """Everything at tiny sizes (CPU smoke run)."""
  base = dict(preset="tiny", memory_tokens=(2048, 16384), batches=(1, 4), route_tokens=4,
              doc_tokens=(8, 64), fetch_memory_tokens=4096, encode_preset="tiny",
              encode_tokens=1500, encode_row_tokens=256, encode_batch_rows=2, copy_bytes=16 << 20, matmul_size=256,
              steps=3, warmup=1)
  return MemoryBenchSettings(**(base | overrides))


# --------------------------------------------------------------------------- helpers


def time_call(fn: Callable, args, *, steps: int, warmup: int) -> dict[str, Any]:
  """Compiles `fn` (jitted) ahead of time and times it: compile_s, median_s, times_s."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return {"compile_s": compile_s, "median_s": statistics.median(times), "times_s": times}


def copy_bandwidth(num_bytes: int, *, steps: int, warmup: int) -> dict[str, Any]:
  """Device memory bandwidth of x -> x + 1 over float32 (bytes read plus written per second)."""
  n = max(1, num_bytes // 4)
  x = jax.jit(lambda: jnp.arange(n, dtype=jnp.float32))()
  timing = time_call(jax.jit(lambda x: x + 1.0), (x,), steps=steps, warmup=warmup)
  del x
  return {"bytes": 8 * n, "bytes_per_s": 8 * n / timing["median_s"], **timing}


def host_link_bandwidth(num_bytes: int, memory_kind: str, *, steps: int,
                        warmup: int) -> dict[str, Any]:
  """Host-to-device bandwidth of one device: a jitted move of a float32 array in host memory
  (`memory_kind`) into device memory, as the pinned_host tier moves its gathered rows (bytes moved
  per second)."""
  n = max(1, num_bytes // 4)
  device = jax.devices()[0]
  x = jax.device_put(jax.jit(lambda: jnp.arange(n, dtype=jnp.float32))(),
                     jax.sharding.SingleDeviceSharding(device, memory_kind=memory_kind))
  timing = time_call(jax.jit(lambda x: jax.device_put(x, jax.memory.Space.Device)), (x,),
                     steps=steps, warmup=warmup)
  del x
  return {"bytes": 4 * n, "memory_kind": memory_kind, "bytes_per_s": 4 * n / timing["median_s"],
          **timing}


def matmul_rate(n: int, dtype=jnp.float32, *, steps: int, warmup: int) -> dict[str, Any]:
  """FLOP/s of an [n, n] x [n, n] product of `dtype` operands accumulating in float32 at the
  default precision (what routing's score matmul does): the compute ceiling for the score FLOPs."""
  a, b = jax.jit(lambda: tuple(jax.random.normal(jax.random.key(i), (n, n), jnp.float32).astype(
      dtype) for i in range(2)))()
  dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  timing = time_call(dot, (a, b), steps=steps, warmup=warmup)
  return {"n": n, "dtype": jnp.dtype(dtype).name, "flops_per_s": 2.0 * n**3 / timing["median_s"],
          **timing}


def random_documents(rng: np.random.Generator, total_tokens: int, doc_tokens, chunk_size: int):
  """CSR chunk offsets of documents with uniform random lengths filling `total_tokens`."""
  lengths = []
  left = total_tokens
  while left > 0:
    n = min(left, int(rng.integers(doc_tokens[0], doc_tokens[1] + 1)))
    lengths.append(n)
    left -= n
  chunks = -(-np.asarray(lengths) // chunk_size)
  return np.concatenate([[0], np.cumsum(chunks)]), lengths


def _status(error: BaseException) -> dict[str, Any]:
  return {"status": "OOM" if common.is_oom(error) else "error",
          "error": f"{type(error).__name__}: {str(error)[:1000]}"}


def _memory_mesh():
  return jax.make_mesh((jax.device_count(),), (MEMORY_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def _random_rows(mesh, plan, row_shape, dtype, seed, memory_kind=None):
  """Random chunk rows [S·C_s, *row_shape] created directly on the devices, sharded over memory."""
  shape = (plan.num_shards * plan.slots_per_shard,) + tuple(row_shape)
  sharding = NamedSharding(mesh, P(MEMORY_AXIS), memory_kind=memory_kind)
  make = jax.jit(lambda key: jax.random.normal(key, shape, jnp.float32).astype(dtype),
                 out_shardings=sharding.with_memory_kind("device") if memory_kind else sharding)
  out = make(jax.random.key(seed))
  return jax.device_put(out, sharding) if memory_kind else out


# --------------------------------------------------------------------------- parts


def bench_routing(settings: MemoryBenchSettings, model: cfglib.ModelConfig, msa: cfglib.MSAConfig,
                  bandwidth: float, flop_rate: float, progress) -> list[dict[str, Any]]:
  mesh = _memory_mesh()
  rng = np.random.default_rng(settings.seed)
  row_shape = (model.num_kv_heads, model.head_dim)
  results = []
  for tokens in settings.memory_tokens:
    offsets, _ = random_documents(rng, tokens, settings.doc_tokens, msa.chunk_size)
    plan = routing.plan_shards(offsets, mesh.shape[MEMORY_AXIS])
    scaled = router_keys.has_scale(settings.key_dtype)
    key_bytes = plan.slots_per_shard * (  # one device's shard
        math.prod(row_shape) * jnp.dtype(settings.key_dtype).itemsize + 4 * row_shape[0] * scaled)
    base = {"memory_tokens": tokens, "num_docs": plan.num_docs, "num_chunks": int(offsets[-1]),
            "shards": plan.num_shards, "key_bytes_per_device": key_bytes,
            "floor_s": key_bytes / bandwidth}
    try:
      keys = _random_rows(mesh, plan, row_shape, jnp.float32, settings.seed)
      keys, scale = jax.jit(lambda k: router_keys.prepare(
          *router_keys.quantize(k, settings.key_dtype), msa))(keys)
      chunk_doc = routing.place_table(mesh, plan.chunk_doc.reshape(-1))
      doc_index = routing.place_table(mesh, plan.doc_index.reshape(-1))
    except Exception as e:  # noqa: BLE001 - record and go on
      results.extend({**base, "batch": b, **_status(e)} for b in settings.batches)
      progress(f"[routing {tokens:,} tokens] {results[-1]['status']}")
      break
    for b in settings.batches:
      q_r = jax.random.normal(jax.random.key(b), (b, settings.route_tokens, model.num_heads,
                                                  model.head_dim), jnp.bfloat16)
      mask = jnp.ones((b, settings.route_tokens), bool)
      fn = jax.jit(lambda q, m, k, s, c, i: routing.route_sharded(
          q, m, k, c, i, msa, mesh=mesh, num_docs=plan.num_docs,
          coupled_scale=not msa.decouple_router, key_scale=s,
          implementation=settings.routing_kernel))
      try:
        timing = time_call(fn, (q_r, mask, keys, scale, chunk_doc, doc_index),
                           steps=settings.steps, warmup=settings.warmup)
      except Exception as e:  # noqa: BLE001
        results.append({**base, "batch": b, **_status(e)})
        progress(f"[routing {tokens:,} tokens, batch {b}] {results[-1]['status']}")
        continue
      width = model.num_kv_heads if msa.head_reduce == "mean" else model.num_heads
      flops = 2.0 * b * settings.route_tokens * plan.slots_per_shard * width * model.head_dim
      results.append({**base, "batch": b, "status": "ok", **timing,
                      "over_floor": timing["median_s"] / base["floor_s"],
                      "compute_floor_s": flops / flop_rate,
                      "key_bytes_per_s": key_bytes / timing["median_s"],
                      "score_flops_per_device": flops,
                      "score_flops_per_s": flops / timing["median_s"]})
      progress(f"[routing {tokens:,} tokens, batch {b}] {timing['median_s'] * 1e3:.3f} ms "
               f"(floor {base['floor_s'] * 1e3:.3f} ms, x{results[-1]['over_floor']:.2f})")
    del keys, scale, chunk_doc, doc_index
    gc.collect()
  return results


def _selections(rng, num_docs: int, batch: int, k: int):
  index = np.stack([rng.choice(num_docs, size=min(k, num_docs), replace=False)
                    for _ in range(batch)]).astype(np.int32)
  if index.shape[1] < k:
    index = np.pad(index, ((0, 0), (0, k - index.shape[1])), constant_values=-1)
  return index, index >= 0


def bench_fetch_resident(settings, model, msa, progress, which) -> list[dict[str, Any]]:
  """Resident tiers (`which` of device, pinned_host) over random content of the model's shape."""
  mesh = _memory_mesh()
  rng = np.random.default_rng(settings.seed + 1)
  offsets, _ = random_documents(rng, settings.fetch_memory_tokens, settings.doc_tokens,
                                msa.chunk_size)
  plan = routing.plan_shards(offsets, mesh.shape[MEMORY_AXIS])
  dtype = jnp.dtype(model.compute_dtype)
  row_shape = (model.num_kv_heads, model.head_dim)
  results = []
  replicated = NamedSharding(mesh, P())
  tables = [jax.device_put(t, replicated) for t in (plan.doc_shard, plan.doc_local_start,
                                                    plan.doc_chunks)]
  for tier in which:
    kind = tiers.host_memory_kind(jax.devices()[0]) if tier == "pinned_host" else None
    base = {"tier": tier, "memory_kind": kind or "device",
            "memory_tokens": settings.fetch_memory_tokens, "num_docs": plan.num_docs,
            "max_doc_chunks": plan.max_doc_chunks}
    if tier == "pinned_host" and kind is None:
      results.append({**base, "status": "unavailable"})
      continue
    try:
      content = [_random_rows(mesh, plan, row_shape, dtype, settings.seed + i, kind)
                 for i in range(2)]
    except Exception as e:  # noqa: BLE001
      results.append({**base, **_status(e)})
      continue
    for b in settings.batches:
      index, valid = _selections(rng, plan.num_docs, b, msa.top_k_docs)
      moved = 2 * int(plan.doc_chunks[index[valid]].sum()) * math.prod(row_shape) * dtype.itemsize
      fn = jax.jit(lambda ck, cv, i, v, *t: tiers.gather_resident(
          ck, cv, i, v, *t, mesh=mesh, max_doc_chunks=plan.max_doc_chunks,
          on_host=tier == "pinned_host"))
      try:
        timing = time_call(fn, (*content, jnp.asarray(index), jnp.asarray(valid), *tables),
                           steps=settings.steps, warmup=settings.warmup)
      except Exception as e:  # noqa: BLE001
        results.append({**base, "batch": b, **_status(e)})
        progress(f"[fetch {tier}, batch {b}] {results[-1]['status']}: {results[-1]['error'][:200]}")
        continue
      results.append({**base, "batch": b, "status": "ok", "bytes_moved": moved,
                      "bytes_per_s": moved / timing["median_s"], **timing})
      progress(f"[fetch {tier}, batch {b}] {timing['median_s'] * 1e3:.3f} ms for {moved / 2**20:.2f}"
               f" MiB of selected chunks")
    del content
    gc.collect()
  return results


def bench_fetch_store(settings, bank, msa, progress) -> list[dict[str, Any]]:
  """The tensorstore tier: per-layer reads of the selected rows from the encoded bank on disk."""
  rng = np.random.default_rng(settings.seed + 2)
  counts = np.diff(bank.doc_chunk_offsets).astype(np.int32)
  m = int(counts.max())
  row_shape = tuple(bank.chunk_shape)
  dtype = bank.read_rows("content_k", 0, np.zeros(1, np.int64)).dtype
  results = []
  for b in settings.batches:
    index, valid = _selections(rng, bank.num_docs, b, msa.top_k_docs)
    moved = 2 * int(counts[index[valid]].sum()) * math.prod(row_shape) * dtype.itemsize
    fn = jax.jit(lambda layer, i, v, c: tiers.gather_from_store(
        bank.read_rows, bank.doc_chunk_offsets, layer, i, v, c, max_doc_chunks=m,
        row_shape=row_shape, dtype=dtype))
    timing = time_call(fn, (jnp.int32(0), jnp.asarray(index), jnp.asarray(valid),
                            jnp.asarray(counts)), steps=settings.steps, warmup=settings.warmup)
    results.append({"tier": "tensorstore", "batch": b, "status": "ok", "num_docs": bank.num_docs,
                    "max_doc_chunks": m, "bytes_moved": moved,
                    "bytes_per_s": moved / timing["median_s"], **timing})
    progress(f"[fetch tensorstore, batch {b}] {timing['median_s'] * 1e3:.3f} ms for "
             f"{moved / 2**20:.2f} MiB of selected chunks")
  return results


def bench_encode(settings, out_dir: str, progress):
  """Encodes a random-text corpus with random weights; returns (result, bank path)."""
  from msa_jax.data.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
  from msa_jax.data.transcript import document_ids  # pylint: disable=import-outside-toplevel
  from msa_jax.memory.encode import encode_corpus  # pylint: disable=import-outside-toplevel
  from msa_jax.model.model import MSAForCausalLM  # pylint: disable=import-outside-toplevel

  tok = Tokenizer.from_file(settings.tokenizer)
  model_cfg, msa = cfglib.preset(settings.encode_preset)
  model_cfg = model_cfg.replace(param_dtype="bfloat16", compute_dtype="bfloat16",
                                vocab_size=max(model_cfg.vocab_size, tok.vocab_size))
  model = MSAForCausalLM(model_cfg, msa.validate_for(model_cfg))
  rng = np.random.default_rng(settings.seed + 3)
  texts, lengths = [], []
  limit = min(settings.encode_row_tokens, model_cfg.max_position_embeddings)
  while sum(lengths) < settings.encode_tokens:
    n_words = int(rng.integers(settings.doc_tokens[0], settings.doc_tokens[1] + 1)) // 2
    text = " ".join(rng.choice(_WORDS, max(1, n_words)))
    n = len(document_ids(tok, len(texts), text, msa.doc_align_to))
    if n > limit:
      continue
    texts.append(text)
    lengths.append(n)
  params, _ = forward.init_params(model, settings.seed)
  path = os.path.join(out_dir, "encoded_bank")
  if os.path.exists(path):
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.rmtree(path)
  stats = encode_corpus(model, params, tok, texts, path, batch_rows=settings.encode_batch_rows,
                        row_tokens=settings.encode_row_tokens, log=progress, progress_every_s=5.0)
  work = forward.Workload(batch=1, doc_lengths=tuple(lengths), seq_len_prompt=0,
                               template_len=0, question_len=0)
  flops = forward.model_flops(model_cfg, model.msa, work, "forward")
  encode_flops = flops["dense_memory"] + flops["attention_memory"]
  peak = common.peak_bf16_flops(jax.devices()[0].device_kind)
  steady = stats.steady_tokens_per_second
  per_token = encode_flops / sum(lengths)
  del params
  gc.collect()
  return {"preset": settings.encode_preset, "documents": stats.documents, "tokens": stats.tokens,
          "slot_tokens": stats.slot_tokens, "batches": stats.batches, "seconds": stats.seconds,
          "first_batch_seconds": stats.first_batch_seconds,
          "tokens_per_s": stats.tokens_per_second, "steady_tokens_per_s": steady,
          "model_flops": encode_flops, "model_flops_per_token": per_token,
          "mfu": per_token * steady / peak if (peak and steady) else None, "status": "ok"}, path


# --------------------------------------------------------------------------- the benchmark


def run(settings: MemoryBenchSettings, out_dir: str, progress=print) -> dict[str, Any]:
  """Runs every part, rewriting the report in `out_dir` after each one (a part that takes the
  process down still leaves the earlier results). The pinned_host tier runs last: its host-side
  gather is the part least proven on accelerators."""
  model_cfg, msa = cfglib.preset(settings.preset)
  msa = msa.validate_for(model_cfg)
  device = jax.devices()[0]
  report: dict[str, Any] = {
      "device_kind": device.device_kind, "platform": device.platform,
      "num_devices": jax.device_count(), "jax_version": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "settings": dataclasses.asdict(settings), "config": cfglib.config_to_dict(model_cfg, msa),
      "routing": [], "fetch": [], "encode": {"status": "not run"},
  }
  progress(f"device {device.device_kind} x{jax.device_count()}, jax {jax.__version__}, preset "
           f"{settings.preset}")
  report["copy_bandwidth"] = copy_bandwidth(settings.copy_bytes, steps=settings.steps,
                                            warmup=settings.warmup)
  bandwidth = report["copy_bandwidth"]["bytes_per_s"]
  report["matmul_rate"] = matmul_rate(settings.matmul_size,
                                      router_keys.query_dtype(settings.key_dtype),
                                      steps=settings.steps, warmup=settings.warmup)
  flop_rate = report["matmul_rate"]["flops_per_s"]
  progress(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, {report['matmul_rate']['dtype']} matmul "
           f"{flop_rate / 1e12:.1f} TFLOP/s")
  report["routing"] = bench_routing(settings, model_cfg, msa, bandwidth, flop_rate, progress)
  write_report(report, out_dir)
  if "device" in settings.tiers:
    report["fetch"] += bench_fetch_resident(settings, model_cfg, msa, progress, ("device",))
    write_report(report, out_dir)
  jax.clear_caches()
  try:
    report["encode"], bank_path = bench_encode(settings, out_dir, progress)
  except Exception as e:  # noqa: BLE001 - the routing and fetch results still count
    report["encode"], bank_path = _status(e), None
    progress(f"[encode] {report['encode']['status']}: {report['encode']['error'][:300]}")
  if "tensorstore" in settings.tiers and bank_path is not None:
    from msa_jax.memory.bank import open_bank  # pylint: disable=import-outside-toplevel
    report["fetch"] += bench_fetch_store(settings, open_bank(bank_path), msa, progress)
  write_report(report, out_dir)
  if "pinned_host" in settings.tiers:
    report["fetch"] += bench_fetch_resident(settings, model_cfg, msa, progress, ("pinned_host",))
    write_report(report, out_dir)
  return report


def format_table(report: dict[str, Any]) -> str:
  lines = [f"bench_memory on {report['device_kind']} x{report['num_devices']} "
           f"(jax {report['jax_version']}), copy bandwidth "
           f"{report['copy_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s",
           f"{report['matmul_rate'].get('dtype', 'float32')} matmul "
           f"{report['matmul_rate']['flops_per_s'] / 1e12:.1f} TFLOP/s",
           f"routing (one router layer, {report['settings'].get('key_dtype', 'float32')} keys): "
           "tokens  batch  median ms  floor ms  x floor  "
           "score-matmul ms at the measured rate"]
  for r in report["routing"]:
    if r["status"] == "ok":
      lines.append(f"  {r['memory_tokens']:>12,}  {r['batch']:>5}  {r['median_s'] * 1e3:9.3f}  "
                   f"{r['floor_s'] * 1e3:8.3f}  {r['over_floor']:7.2f}  "
                   f"{r['compute_floor_s'] * 1e3:8.3f}")
    else:
      lines.append(f"  {r['memory_tokens']:>12,}  {r['batch']:>5}  {r['status']}")
  lines.append("fetch (k selected documents, one layer): tier  batch  median ms  MiB  GB/s")
  for r in report["fetch"]:
    if r.get("status") == "ok":
      lines.append(f"  {r['tier']:<12} {r['batch']:>5}  {r['median_s'] * 1e3:9.3f}  "
                   f"{r['bytes_moved'] / 2**20:6.2f}  {r['bytes_per_s'] / 1e9:6.2f}")
    else:
      lines.append(f"  {r['tier']:<12} {r.get('batch', '-'):>5}  {r.get('status')}")
  e = report.get("encode", {})
  if e.get("status") == "ok":
    mfu = "n/a" if e["mfu"] is None else f"{e['mfu']:.1%}"
    lines.append(f"encode ({e['preset']}): {e['tokens']:,} tokens, {e['tokens_per_s']:.4g} tokens/s "
                 f"overall, {e['steady_tokens_per_s']:.4g} after the first batch, MFU {mfu}")
  else:
    lines.append(f"encode: {e.get('status')}")
  return "\n".join(lines)


def write_chart(report: dict[str, Any], path: str) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  ok = [r for r in report["routing"] if r["status"] == "ok"]
  for i, b in enumerate(sorted({r["batch"] for r in ok})):
    rows = sorted((r for r in ok if r["batch"] == b), key=lambda r: r["memory_tokens"])
    sizes_b = [r["memory_tokens"] for r in rows]
    ax.plot(sizes_b, [r["median_s"] * 1e3 for r in rows], "o-", color=f"C{i}",
            label=f"routing, batch {b}")
    ax.plot(sizes_b, [r["compute_floor_s"] * 1e3 for r in rows], ":", color=f"C{i}",
            label=f"score matmul at the measured f32 rate, batch {b}")
  sizes = sorted({r["memory_tokens"]: r for r in report["routing"]}.items())
  if sizes:
    ax.plot([s for s, _ in sizes], [r["floor_s"] * 1e3 for _, r in sizes], "k--",
            label="floor: key bytes / copy bandwidth")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("memory tokens")
  ax.set_ylabel("ms per router layer")
  ax.set_title(f"Exact sharded routing, {report['settings']['preset']} shape, "
               f"{report['device_kind']} x{report['num_devices']}", fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_report(report: dict[str, Any], out_dir: str) -> tuple[str, str]:
  """bench_memory.json and bench_memory.png in `out_dir`."""
  return write_json_and_chart(report, os.path.join(out_dir, "bench_memory.json"),
                              os.path.join(out_dir, "bench_memory.png"), write_chart)
