"""Generation benchmark: time to first token, decode tokens/s and memory per device through the
engine, over a memory bank view filled directly with random pooled keys/values at the model's
shapes (no encoding), for each device count and content tier.

For each device count N, memory size (tokens; documents of `doc_len` tokens, so `doc_len / P`
chunks each), content tier and batch size, with random weights:
  TTFT     `Engine.prefill` of B requests (host batch building, stage 2 with routing over the whole
           memory in every router layer, the gather of the winners' chunks, attention, the first
           logits, the routing returned to the host), median over `repeats` after a warm-up;
  decode   `Engine.decode` of `new_tokens` tokens per row (one on-device loop; no stop ids, so
           every row runs the whole budget): B·new_tokens / time;
  memory   per device, the bytes of the weights and of the view's arrays it holds in device memory
           (HBM) and in host memory, summed over the placed arrays' shards; the tensorstore tier's
           bytes on disk; where the backend reports them, each device's peak bytes in use (the
           allocator's high-water mark so far in the process, not per point); the process's
           resident set.

Memory parallel (DESIGN.md "Memory bank"): the view lies on a `memory` mesh of the first N devices,
whole documents per device (`routing.plan_shards`), routed by the exact sharded top-k of
`msa_jax.memory.routing`; the weights are replicated, so every device runs the dense layers of the
whole batch. Content tiers (`msa_jax.memory.tiers`): `device` (K̄/V̄ sharded like the router keys, in
device memory), `pinned_host` (the same layout in host memory: each device gathers its winners' rows
on the host side and moves only those), `tensorstore` (K̄/V̄ written to a zarr3 store on disk in the
bank's layout, read per router layer through a host callback). Router keys are in device memory in
every tier.

Every chunk row's values come from the seed and the row's global index alone: router keys are random
unit vectors (what `router_keys.prepare` makes of cosine-mode keys) in bfloat16, the default key
dtype, content random normals in the model's dtype. So every device count and tier serves the same
memory, and greedy decoding must give the same tokens; each point records its first tokens and its
first router layer's selections.

Floors (METHOD.md: the larger of bytes / bandwidth and FLOPs / peak): a decode step must read the
weights and every cache entry once; a prefill must read the weights and the device's shard of the
router keys once (its FLOPs: the dense layers over the batch plus the device's share of the routing
scores), and with the pinned_host tier move the device's share of the winners' K̄/V̄ over its host
link. The device bandwidth is measured here with a large device copy, the host link with a copy from
host memory (`benchmarks.memory`).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import shutil
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks import common, forward
from benchmarks.memory import copy_bandwidth, host_link_bandwidth
from msa_jax.atomic_dir import write_json_and_chart
from msa_jax.inference.engine import Engine
from msa_jax.inference.requests import Request, SamplingConfig
from msa_jax.memory import bank_view, routing, store
from msa_jax.memory import tiers as memory_tiers
from msa_jax.memory.routing import MEMORY_AXIS
from msa_jax.memory.writer import DEFAULT_ROWS_PER_CHUNK
from msa_jax.model.model import MSAForCausalLM
from msa_jax.model.router_keys import DEFAULT_KEY_DTYPE
from msa_jax.sharding import make_mesh


_KEY_DTYPE = jnp.dtype(DEFAULT_KEY_DTYPE)
_STORE_BLOCK_BYTES = 64 << 20  # content rows generated and written per store write
_DISK_FRACTION = 0.9  # of the free disk the tensorstore tier's content may take


@dataclasses.dataclass(frozen=True)
class GenerateBenchSettings:
  """What to benchmark (the binary's flags). `fill_max` adds, per device count and tier, the largest
  memory that fits the free memory (estimated, then shrunk on OOM). `devices`: device counts (the
  first N devices hold the memory); `tiers`: content tiers; `store_dir`: where the tensorstore tier
  writes its content ("" = the system's temporary directory; removed after each memory)."""

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
  max_fraction: float = 0.85  # of free device (host, disk) memory the memory view may take
  seed: int = 0
  devices: tuple[int, ...] = (1,)
  tiers: tuple[str, ...] = ("device",)
  store_dir: str = ""

  def __post_init__(self):
    for name in ("memory_tokens", "batches", "devices"):
      object.__setattr__(self, name, tuple(int(t) for t in getattr(self, name)))
    object.__setattr__(self, "tiers", tuple(self.tiers))
    for name in ("doc_len", "prompt_len", "question_len", "new_tokens", "repeats"):
      if getattr(self, name) <= 0:
        raise common.BenchError(f"{name} must be positive, got {getattr(self, name)}")
    if not self.batches or min(self.batches) <= 0:
      raise common.BenchError(f"batches must be positive, got {self.batches}")
    if not self.devices or min(self.devices) <= 0:
      raise common.BenchError(f"device counts must be positive, got {self.devices}")
    bad = [t for t in self.tiers if t not in memory_tiers.TIERS]
    if bad or not self.tiers or len(set(self.tiers)) != len(self.tiers):
      raise common.BenchError(f"tiers must be distinct names among {memory_tiers.TIERS}, got "
                              f"{self.tiers}")
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


def bytes_per_token(model, msa) -> tuple[float, float]:
  """(router-key bytes, content K̄+V̄ bytes) of a bank view per memory token (no padding)."""
  row = len(msa.router_layers) * model.num_kv_heads * model.head_dim / msa.chunk_size
  return row * _KEY_DTYPE.itemsize, 2 * row * jnp.dtype(model.param_dtype).itemsize


def view_bytes_per_token(model, msa) -> float:
  """Device bytes of a bank view per memory token with everything in device memory."""
  return sum(bytes_per_token(model, msa))


def memory_plan(msa, memory_tokens: int, doc_len: int, shards: int):
  """(CSR chunk offsets, shard plan, tokens held) of `memory_tokens // doc_len` documents."""
  num_docs = memory_tokens // doc_len
  offsets = np.arange(num_docs + 1, dtype=np.int64) * -(-doc_len // msa.chunk_size)
  return offsets, routing.plan_shards(offsets, shards), num_docs * doc_len


def row_values(key, rows, row_shape, dtype, unit: bool):
  """Values [n, *row_shape] of bank rows `rows` [n]: row i's come from `fold_in(key, i)` alone, so
  every sharding of a memory holds the same values; rows < 0 (empty slots) are zeros. `unit`:
  L2-normalised over the last axis (cosine-mode router keys)."""

  def one(row):
    x = jax.random.normal(jax.random.fold_in(key, row), tuple(row_shape), jnp.float32)
    return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True)) if unit else x

  x = jax.vmap(one)(jnp.maximum(rows, 0))
  live = (rows >= 0).reshape((-1,) + (1,) * len(row_shape))
  return jnp.where(live, x, 0.0).astype(dtype)


def sharded_rows(mesh, plan, key, num_layers: int, row_shape, dtype, unit: bool) -> jax.Array:
  """[L_r, S·C_s, *row_shape] sharded over `memory` along axis 1: router layer r's slots hold
  `row_values(fold_in(key, r), <their bank rows>)`, made on the devices one layer at a time (peak:
  the array plus one layer)."""
  rows = routing.place_table(mesh, plan.chunk_rows.reshape(-1).astype(np.int32))
  shape = (num_layers,) + (plan.slots_per_shard,) + tuple(row_shape)

  def per_shard(key, rows):
    def layer(r, buf):
      x = row_values(jax.random.fold_in(key, r), rows, row_shape, dtype, unit)
      return lax.dynamic_update_index_in_dim(buf, x, r, 0)
    return lax.fori_loop(0, num_layers, layer, jnp.zeros(shape, dtype))

  fill = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P(MEMORY_AXIS)),
                               out_specs=P(None, MEMORY_AXIS), check_vma=False))
  return fill(key, rows)


class ContentStore:
  """A random memory's content K̄/V̄ [L_r, C, Hkv, D] in zarr3 arrays on disk (the bank's layout,
  `msa_jax.memory.store`), with the part of the `Bank` API the tensorstore tier reads."""

  def __init__(self, path: str, doc_chunk_offsets: np.ndarray, arrays: dict):
    self.path = path
    self.doc_chunk_offsets = doc_chunk_offsets
    self._arrays = arrays

  def read_rows(self, name: str, r: int, rows) -> np.ndarray:
    return store.read(self.path, self._arrays[name], name,
                      (int(r), np.asarray(rows, np.int64).reshape(-1)))

  def nbytes(self) -> int:
    """Bytes of the arrays' files on disk."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(self.path)
               for f in files)


def write_content_store(path: str, doc_chunk_offsets, num_layers: int, row_shape, dtype, key,
                        progress: Callable[[str], None], label: str) -> ContentStore:
  """The content `sharded_rows` would place (content_k from `fold_in(key, 0)`, content_v from
  `fold_in(key, 1)`), generated on the first device in blocks and written to zarr3 arrays at `path`."""
  num_chunks = int(doc_chunk_offsets[-1])
  dtype = jnp.dtype(dtype)
  block = max(1, min(num_chunks, _STORE_BLOCK_BYTES // (int(np.prod(row_shape)) * dtype.itemsize)))
  make = jax.jit(lambda key, start: row_values(
      key, start + jnp.arange(block, dtype=jnp.int32), row_shape, dtype, False))
  arrays = {}
  t0 = last = time.perf_counter()
  for i, name in enumerate(("content_k", "content_v")):
    shape = (num_layers, num_chunks) + tuple(row_shape)
    arrays[name] = array = store.create_array(
        path, name, shape, dtype.name, store.chunk_shape_of(name, shape, DEFAULT_ROWS_PER_CHUNK))
    for r in range(num_layers):
      layer_key = jax.random.fold_in(jax.random.fold_in(key, i), r)
      for start in range(0, num_chunks, block):
        stop = min(num_chunks, start + block)
        array[r, start:stop].write(np.asarray(make(layer_key, start))[:stop - start]).result()
      if time.perf_counter() - last > 10 or r == num_layers - 1:
        last = time.perf_counter()
        done = (i * num_layers + r + 1) / (2 * num_layers)
        progress(f"[{label}] store: {name} layer {r + 1}/{num_layers} written, {done:.0%} "
                 f"after {last - t0:.1f} s")
  return ContentStore(path, np.asarray(doc_chunk_offsets, np.int64), arrays)


def memory_figures(params, view, keys, devices, content_store) -> dict[str, Any]:
  """Bytes per device (lists in `devices` order) of the weights, the router keys, and everything
  resident in device memory (HBM) and in host memory, summed over the arrays' shards (a
  replicated array counts on every device); the tensorstore content's bytes on disk."""
  index = {d: i for i, d in enumerate(devices)}

  def per_device(tree) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for a in jax.tree.leaves(tree):
      row = out.setdefault(a.sharding.memory_kind or "device", [0] * len(devices))
      for shard in a.addressable_shards:
        row[index[shard.device]] += shard.data.nbytes
    return out

  zeros = [0] * len(devices)
  weights = per_device(params).get("device", zeros)
  placed = per_device(view)
  host = [sum(v[i] for k, v in placed.items() if k != "device") for i in range(len(devices))]
  return {"weights_bytes_per_device": weights,
          "router_key_bytes_per_device": per_device(keys).get("device", zeros),
          "hbm_bytes_per_device": [w + v for w, v in zip(weights, placed.get("device", zeros))],
          "host_bytes_per_device": host,
          "store_bytes": content_store.nbytes() if content_store is not None else 0}


def max_memory_tokens(model, msa, tier: str, devices, settings: GenerateBenchSettings,
                      store_root: str) -> int | None:
  """The largest memory (whole documents) whose view fits `max_fraction` of the free memory of
  these devices (after the weights) and, for content off the device, of the host or the disk; None
  where the backend does not report its device memory (CPU)."""
  free = memory_tiers.free_device_bytes(devices)
  if free is None:
    return None
  keys, content = bytes_per_token(model, msa)
  on_device = keys + (content if tier == "device" else 0.0)
  tokens = free * settings.max_fraction * len(devices) / on_device
  if tier == "pinned_host":
    tokens = min(tokens, memory_tiers.free_host_bytes() * settings.max_fraction / content)
  if tier == "tensorstore":
    tokens = min(tokens, shutil.disk_usage(store_root).free * settings.max_fraction / content)
  return int(tokens) // settings.doc_len * settings.doc_len


def _process_rss_bytes() -> int | None:
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return None


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
  """Warm-up (compiles), then `repeats` × (prefill timed, decode timed). Also returns the last
  run's first token and first-router-layer documents per request."""
  ttft, decode = [], []
  greedy = SamplingConfig()
  for i in range(settings.warmup + settings.repeats):
    t0 = time.perf_counter()
    state, routed = engine.prefill(requests)
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
          "decode_step_s": decode_s / max(1, settings.new_tokens - 1),
          "first_tokens": [t[0] for t in tokens],
          "routed_docs": [r[0].doc_index.tolist() if r else [] for r in routed]}


@dataclasses.dataclass(frozen=True)
class _Context:
  """What every point of one run shares."""

  model: MSAForCausalLM
  params_bytes: int
  settings: GenerateBenchSettings
  bandwidth: float
  host_bandwidth: float | None
  peak: float | None
  store_root: str
  progress: Callable[[str], None]


def _floors(ctx: _Context, memory_tokens: int, batch: int, devices: int, tier: str,
            key_bytes_per_device) -> dict[str, Any]:
  """Lower bounds (s) of one device: prefill reads the weights and its router-key shard, does the
  dense FLOPs of the batch plus its share of the routing scores and, with the pinned_host tier,
  moves its share of the winners' K̄/V̄ over the host link; a decode step reads the weights and
  the cache."""
  model, msa, settings = ctx.model.config, ctx.model.msa, ctx.settings
  chunks = memory_tokens / msa.chunk_size
  row = model.num_kv_heads * model.head_dim
  routers = len(msa.router_layers)
  key_bytes = routers * chunks * row * _KEY_DTYPE.itemsize
  params = ctx.params_bytes / jnp.dtype(model.param_dtype).itemsize
  flops = (2 * params * batch * settings.prompt_len +
           2 * batch * settings.question_len * chunks / devices * row * routers)
  selected = msa.top_k_docs * -(-settings.doc_len // msa.chunk_size)
  fetch = 2 * batch * selected * row * jnp.dtype(model.param_dtype).itemsize * routers
  link = (fetch / devices / ctx.host_bandwidth
          if tier == "pinned_host" and ctx.host_bandwidth else None)
  prefill = max((ctx.params_bytes + max(key_bytes_per_device)) / ctx.bandwidth,
                flops / ctx.peak if ctx.peak else 0.0, link or 0.0)
  slots = settings.prompt_len + settings.new_tokens
  cache = 2 * batch * row * jnp.dtype(model.compute_dtype).itemsize * (
      model.num_layers * slots + routers * selected)
  return {"prefill_floor_s": prefill, "host_link_floor_s": link,
          "decode_step_floor_s": (ctx.params_bytes + cache) / ctx.bandwidth,
          "router_key_bytes": key_bytes, "content_fetch_bytes": fetch}


# --------------------------------------------------------------------------- the benchmark


def _print(line: str) -> None:
  print(line, flush=True)


def run_benchmark(settings: GenerateBenchSettings, progress: Callable[[str], None] = _print,
                  checkpoint: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
  """Every (device count, memory, tier, batch) point; `checkpoint(report)` after each memory (a
  long run that dies keeps what it measured)."""
  if max(settings.devices) > jax.device_count():
    raise common.BenchError(f"device counts {settings.devices} need {max(settings.devices)} "
                            f"devices; this process has {jax.device_count()}")
  model_cfg, msa_cfg = forward.model_configs(
      forward.BenchSettings(preset=settings.preset, param_dtype="bfloat16"))
  if settings.prompt_len <= msa_cfg.template_len:
    raise common.BenchError(f"prompt_len must exceed the template head "
                            f"({msa_cfg.template_len})")
  store_root = settings.store_dir or tempfile.gettempdir()
  model = MSAForCausalLM(model_cfg, msa_cfg)
  device = jax.devices()[0]
  params, _ = forward.init_params(model, settings.seed)
  params_bytes = common.tree_bytes(params)
  probe = min(2 << 30, max(1 << 24, params_bytes))
  bandwidth = copy_bandwidth(probe, steps=10, warmup=2)["bytes_per_s"]
  host_kind = memory_tiers.host_memory_kind(device)
  host_bandwidth = None
  if "pinned_host" in settings.tiers and host_kind is not None:
    host_bandwidth = host_link_bandwidth(probe // 2, host_kind, steps=10, warmup=2)["bytes_per_s"]
  peak = common.peak_bf16_flops(device.device_kind)
  progress(f"{settings.preset}: {common.count_params(params) / 1e9:.3f}B params on "
           f"{jax.device_count()} x {device.device_kind}; copy bandwidth {bandwidth / 1e9:.1f} GB/s"
           + (f", host link {host_bandwidth / 1e9:.1f} GB/s ({host_kind})" if host_bandwidth
              else ""))
  report = {
      "benchmark": "generate", "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "jax_version": jax.__version__, "platform": device.platform,
      "device_kind": device.device_kind, "device_count": jax.device_count(),
      "num_params": common.count_params(params), "params_bytes": params_bytes,
      "copy_bandwidth_bytes_per_s": bandwidth, "host_memory_kind": host_kind,
      "host_link_bandwidth_bytes_per_s": host_bandwidth, "peak_bf16_flops": peak,
      "flags": dataclasses.asdict(settings),
      "view_bytes_per_token": view_bytes_per_token(model_cfg, msa_cfg), "results": []}
  ctx = _Context(model, params_bytes, settings, bandwidth, host_bandwidth, peak, store_root,
                 progress)
  save = checkpoint or (lambda report: None)
  for n in settings.devices:
    devices = jax.devices()[:n]
    mesh = make_mesh((n,), (MEMORY_AXIS,), devices=devices)
    # replicated weights; the first device's copy is the initial one
    placed = jax.device_put(params, NamedSharding(mesh, P()), may_alias=True)
    for tokens in settings.memory_tokens:
      report["results"].extend(_one_memory(ctx, mesh, placed, tokens, settings.tiers))
      save(report)
    for tier in settings.tiers if settings.fill_max else ():
      largest = max_memory_tokens(model_cfg, msa_cfg, tier, devices, settings, store_root)
      if largest is None:
        progress("the backend reports no device memory: no largest-memory run")
      elif largest < settings.doc_len or any(largest <= t for t in settings.memory_tokens):
        largest = None
      for _ in range(3 if largest else 0):  # the largest memory shrinks until it fits
        entry = _one_memory(ctx, mesh, placed, largest, (tier,))
        report["results"].extend(entry)
        save(report)
        if not any(r["status"] == "OOM" for r in entry):
          break
        largest = int(largest * 0.7) // settings.doc_len * settings.doc_len
    del placed
    gc.collect()
  return report


def _label(devices: int, tokens: int) -> str:
  return f"{devices} device{'s' if devices > 1 else ''}, memory {tokens / 1e6:.3g}M"


def _oom(base, batches, error) -> list[dict[str, Any]]:
  return [{**base, "batch": b, "status": "OOM", "error": str(error).splitlines()[0][:300]}
          for b in batches]


def _one_memory(ctx: _Context, mesh, params, tokens: int, which) -> list[dict[str, Any]]:
  """Every tier in `which` and batch size over one memory, its router keys placed once."""
  c, m, settings = ctx.model.config, ctx.model.msa, ctx.settings
  n = mesh.size
  offsets, plan, tokens = memory_plan(m, tokens, settings.doc_len, n)
  label = _label(n, tokens)
  t0 = time.perf_counter()
  try:
    keys = jax.block_until_ready(sharded_rows(
        mesh, plan, jax.random.fold_in(jax.random.key(settings.seed), 0), len(m.router_layers),
        (c.num_kv_heads, c.head_dim), _KEY_DTYPE, True))
  except Exception as e:  # noqa: BLE001 - an OOM is a result; anything else is re-raised
    if not common.is_oom(e):
      raise
    ctx.progress(f"[{label}] OOM placing the router keys")
    return [r for tier in which for r in _oom({"devices": n, "tier": tier,
                                               "memory_tokens": tokens}, settings.batches, e)]
  try:
    ctx.progress(f"[{label}] random view of {tokens} tokens ({plan.num_docs:,} documents): "
                 f"router keys placed in {time.perf_counter() - t0:.1f} s")
    return [r for tier in which
            for r in _one_tier(ctx, mesh, params, offsets, plan, keys, tokens, tier)]
  finally:
    keys.delete()
    gc.collect()


def _one_tier(ctx: _Context, mesh, params, offsets, plan, keys, tokens: int, tier: str
              ) -> list[dict[str, Any]]:
  """Every batch size over one memory with its content in `tier`; an OOM (placing the content or
  running) is recorded, and so is a tier this machine cannot hold."""
  c, m, settings = ctx.model.config, ctx.model.msa, ctx.settings
  n = mesh.size
  label = f"{_label(n, tokens)}, {tier}"
  base = {"devices": n, "tier": tier, "memory_tokens": tokens}
  row_shape, dtype = (c.num_kv_heads, c.head_dim), jnp.dtype(c.param_dtype)
  content_key = jax.random.fold_in(jax.random.key(settings.seed), 1)
  host_kind = memory_tiers.host_memory_kind(mesh.devices.flat[0])
  content_bytes = 2 * len(m.router_layers) * int(offsets[-1]) * int(np.prod(row_shape)) * (
      dtype.itemsize)
  if tier == "pinned_host" and host_kind is None:
    return [{**base, "batch": b, "status": "unavailable",
             "error": "this backend has no host memory kind"} for b in settings.batches]
  if tier == "tensorstore":
    os.makedirs(ctx.store_root, exist_ok=True)
    free = shutil.disk_usage(ctx.store_root).free
    if content_bytes > _DISK_FRACTION * free:
      ctx.progress(f"[{label}] no room: the content needs {content_bytes / 2**30:.1f} GiB, "
                   f"{free / 2**30:.1f} GiB free in {ctx.store_root}")
      return [{**base, "batch": b, "status": "no room",
               "error": f"content of {content_bytes} bytes, {free} bytes free in "
                        f"{ctx.store_root}"} for b in settings.batches]
  out, content, content_store, path = [], [], None, None
  try:
    t0 = time.perf_counter()
    if tier == "tensorstore":
      path = tempfile.mkdtemp(prefix="bench_generate_content_", dir=ctx.store_root)
      content_store = write_content_store(path, offsets, len(m.router_layers), row_shape, dtype,
                                          content_key, ctx.progress, label)
    else:
      for i in range(2):
        x = sharded_rows(mesh, plan, jax.random.fold_in(content_key, i), len(m.router_layers),
                         row_shape, dtype, False)
        if tier == "pinned_host":  # made on the devices, then moved out one array at a time
          y = jax.block_until_ready(jax.device_put(x, x.sharding.with_memory_kind(host_kind)))
          x.delete()
          x = y
        content.append(jax.block_until_ready(x))
    view = bank_view.view_from_arrays(
        plan, mesh, m.router_layers, keys, *(content or (None, None)), tier=tier,
        coupled=not m.decouple_router, store=content_store)
    figures = memory_figures(params, view, keys, list(mesh.devices.flat), content_store)
    ctx.progress(f"[{label}] content placed in {time.perf_counter() - t0:.1f} s; per device HBM "
                 f"{_size(max(figures['hbm_bytes_per_device']))}, host "
                 f"{_size(max(figures['host_bytes_per_device']))}")
    engine = Engine(ctx.model, params, view, max_batch=max(settings.batches))
    for batch in settings.batches:
      entry = {**base, "batch": batch, **figures,
               **_floors(ctx, tokens, batch, n, tier, figures["router_key_bytes_per_device"])}
      requests = random_requests(np.random.default_rng([settings.seed, batch]), c.vocab_size, m,
                                 batch, settings)
      try:
        entry.update(time_generation(engine, requests, settings, ctx.progress,
                                     f"{label}, batch {batch}"))
      except Exception as e:  # noqa: BLE001 - an OOM is a result; anything else is re-raised
        if not common.is_oom(e):
          raise
        entry.update(status="OOM", error=str(e).splitlines()[0][:300])
      stats = [common.memory_stats(d) for d in mesh.devices.flat]
      entry["peak_hbm_bytes_per_device"] = (
          [s.get("peak_bytes_in_use") for s in stats] if all(stats) else None)
      entry["peak_bytes_in_use"] = stats[0].get("peak_bytes_in_use") if stats[0] else None
      entry["process_rss_bytes"] = _process_rss_bytes()
      out.append(entry)
      if entry["status"] == "ok":
        ctx.progress(
            f"[{label}, batch {batch}] TTFT {entry['ttft_s'] * 1e3:.1f} ms (floor "
            f"{entry['prefill_floor_s'] * 1e3:.2f}), decode {entry['decode_tokens_per_s']:.1f}"
            f" tokens/s ({entry['decode_step_s'] * 1e3:.2f} ms/step, floor "
            f"{entry['decode_step_floor_s'] * 1e3:.2f})")
  except Exception as e:  # noqa: BLE001
    if not common.is_oom(e):
      raise
    ctx.progress(f"[{label}] OOM")
    out += _oom(base, settings.batches[len(out):], e)
  finally:
    for x in content:
      x.delete()
    if path is not None:
      shutil.rmtree(path, ignore_errors=True)
    gc.collect()
  return out


# --------------------------------------------------------------------------- output


def _size(num_bytes) -> str:
  if num_bytes is None:
    return "n/a"
  return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def format_table(report: dict[str, Any]) -> str:
  head = ("devices", "tier", "memory tokens", "batch", "status", "TTFT ms", "floor ms",
          "decode tok/s", "ms/step", "floor ms/step", "HBM/device", "host/device", "peak HBM")
  rows = [head]
  for r in report["results"]:
    peaks = r.get("peak_hbm_bytes_per_device")
    where = (str(r.get("devices", 1)), r.get("tier", "device"), f"{r['memory_tokens']:,}",
             str(r["batch"]), r["status"])
    mem = (_size(max(r["hbm_bytes_per_device"])) if "hbm_bytes_per_device" in r else "-",
           _size(max(r["host_bytes_per_device"])) if "host_bytes_per_device" in r else "-",
           _size(max(peaks)) if peaks else "n/a")
    if r["status"] != "ok":
      rows.append(where + ("-",) * 5 + mem)
      continue
    rows.append(where + (f"{r['ttft_s'] * 1e3:.1f}", f"{r['prefill_floor_s'] * 1e3:.2f}",
                         f"{r['decode_tokens_per_s']:.1f}", f"{r['decode_step_s'] * 1e3:.2f}",
                         f"{r['decode_step_floor_s'] * 1e3:.2f}") + mem)
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  f = report["flags"]
  title = (f"MSA generation, {f['preset']} (random weights) on {report['device_kind']} (jax "
           f"{report['jax_version']}): prompt {f['prompt_len']} ({f['question_len']} routing), "
           f"{f['new_tokens']} new tokens, documents of {f['doc_len']} tokens; memory per device: "
           f"weights + view arrays resident in device (HBM) and host memory")
  return "\n".join([title] + lines)


def write_chart(report: dict[str, Any], path: str) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, (ax_ttft, ax_dec, ax_mem) = plt.subplots(1, 3, figsize=(15, 4.2))
  ok = [r for r in report["results"] if r["status"] == "ok"]
  series = sorted({(r.get("devices", 1), r.get("tier", "device")) for r in ok})
  for i, (n, tier) in enumerate(series):
    name = f"{n} dev, {tier}"
    mine = sorted((r for r in ok if (r.get("devices", 1), r.get("tier", "device")) == (n, tier)),
                  key=lambda r: r["memory_tokens"])
    for j, batch in enumerate(report["flags"]["batches"]):
      rows = [r for r in mine if r["batch"] == batch]
      style = dict(color=f"C{i}", marker="os^v"[j % 4], linestyle="-" if j == 0 else "--")
      tokens = [r["memory_tokens"] for r in rows]
      ax_ttft.plot(tokens, [r["ttft_s"] * 1e3 for r in rows], label=f"{name}, B {batch}", **style)
      ax_dec.plot(tokens, [r["decode_tokens_per_s"] for r in rows], label=f"{name}, B {batch}",
                  **style)
    first = [r for r in mine if r["batch"] == report["flags"]["batches"][0]]
    if first and "hbm_bytes_per_device" in first[0]:
      tokens = [r["memory_tokens"] for r in first]
      ax_mem.plot(tokens, [max(r["hbm_bytes_per_device"]) / 2**30 for r in first], "o-",
                  color=f"C{i}", label=f"{name}: HBM")
      ax_mem.plot(tokens, [max(r["host_bytes_per_device"]) / 2**30 for r in first], "s:",
                  color=f"C{i}", label=f"{name}: host")
  for ax, ylabel in ((ax_ttft, "time to first token (ms)"), (ax_dec, "decode tokens/s"),
                     (ax_mem, "resident GiB per device")):
    ax.set_xscale("log")
    ax.set_xlabel("memory tokens")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=7)
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
  """Runs the benchmark, rewriting the report in `out_dir` after each memory, then prints the
  table."""
  checkpoint = (lambda report: write_report(report, out_dir)) if out_dir else None
  report = run_benchmark(settings, progress, checkpoint)
  print(format_table(report), flush=True)
  if out_dir:
    paths = write_report(report, out_dir)
    progress(f"wrote {paths[0]} and {paths[1]}")
  return report
