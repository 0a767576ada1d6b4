"""Serving tiers of a bank's content K̄/V̄ (DESIGN.md "Memory bank"): where the pooled chunks live, and
how the chunks of the selected documents reach the attention.

  device       content sharded over `memory` in accelerator memory, like the router keys
  pinned_host  the same layout in host memory (memory kind `pinned_host`; `unpinned_host` where a
               backend has no pinned kind): each shard gathers its selected rows on the host side and
               only those rows move to the device
  tensorstore  nothing resident: the selected rows are read from the bank's store per router layer
               through a host callback (`jax.experimental.io_callback`)

For device and pinned_host, every shard gathers the rows of the selected documents it owns (zeros
elsewhere) and a `psum` over `memory` assembles the buffer: exactly the k·M selected chunk rows move.
`choose_tier` picks the first tier whose footprint fits the free memory; a flag can force any.

On CPU all memory kinds are the same RAM: the pinned_host tier is tested there for its plumbing (the
arrays carry the host memory kind, the gather runs in host memory space), not for speed.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import io_callback
from jax.sharding import NamedSharding, PartitionSpec as P

from msa_jax.memory.routing import MEMORY_AXIS, RoutingError, ShardPlan

TIERS = ("device", "pinned_host", "tensorstore")


def host_memory_kind(device: jax.Device) -> str | None:
  """The host memory kind this backend offers for resident content (None: no host tier)."""
  kinds = {m.kind for m in device.addressable_memories()}
  for kind in ("pinned_host", "unpinned_host"):
    if kind in kinds:
      return kind
  return None


def free_host_bytes() -> int:
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_device_bytes(devices) -> int | None:
  """The smallest free accelerator memory among this process's `devices`, or None where the backend
  does not say (CPU: device memory is host RAM, so the caller treats the host's free memory as the
  limit). Other processes' devices cannot be asked; they choose the same way on their host."""
  free = []
  for d in devices:
    if d.process_index != jax.process_index():
      continue
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
      return None
    free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
  return min(free) if free else None


def choose_tier(content_bytes_per_device: int, content_bytes_per_host: int, *,
                free_device: int | None, free_host: int, host_kind: str | None,
                forced: str | None = None, fill_fraction: float = 0.8) -> str:
  """The tier for content of this size: device when it fits in `fill_fraction` of the free device
  memory, else pinned_host when it fits in the host's, else tensorstore; `forced` overrides."""
  if forced not in (None, "auto"):
    if forced not in TIERS:
      raise RoutingError(f"unknown content tier {forced!r}; expected one of {TIERS} or 'auto'")
    if forced == "pinned_host" and host_kind is None:
      raise RoutingError("tier 'pinned_host' was forced but this backend has no host memory kind")
    return forced
  device_limit = free_host if free_device is None else free_device
  if content_bytes_per_device <= fill_fraction * device_limit:
    return "device"
  if host_kind is not None and content_bytes_per_host <= fill_fraction * free_host:
    return "pinned_host"
  return "tensorstore"


# --------------------------------------------------------------------------- placement


def place_rows(plan: ShardPlan, mesh, read_shard: Callable[[int], np.ndarray], shape, dtype, *,
               row_axis: int = 0, memory_kind: str | None = None) -> jax.Array:
  """A global array sharded over `memory` along `row_axis`, built shard by shard: `read_shard(s)`
  returns shard s's block. Each process reads only the shards of its own devices (multi-host:
  nothing is assembled on one host), and each shard once even when other mesh axes replicate it."""
  spec = [None] * len(shape)
  spec[row_axis] = MEMORY_AXIS
  sharding = NamedSharding(mesh, P(*spec), memory_kind=memory_kind)
  block = shape[row_axis] // plan.num_shards
  cache: dict[int, np.ndarray] = {}

  def callback(index):
    s = (index[row_axis].start or 0) // block
    if s not in cache:
      cache[s] = np.asarray(read_shard(s), dtype)
    return cache[s]

  return jax.make_array_from_callback(tuple(shape), sharding, callback)


def read_chunk_block(read_rows: Callable[[np.ndarray], np.ndarray], plan: ShardPlan, shard: int,
                     tail, dtype) -> np.ndarray:
  """Shard `shard`'s [C_s, *tail] block of one chunk array: its documents' rows (one read of exactly
  those rows), zeros in the padding slots."""
  rows = plan.chunk_rows[shard]
  live = rows >= 0
  out = np.zeros((rows.size,) + tuple(tail), dtype)
  if live.any():
    out[live] = read_rows(rows[live])
  return out


# --------------------------------------------------------------------------- gather


def _selected_rows(doc_index, valid, doc_local_start, doc_chunks, max_doc_chunks: int):
  """Per (request, winner, chunk) [B, k, M]: the document's local row and whether that chunk exists."""
  doc = jnp.where(valid, doc_index, 0)
  offsets = jnp.arange(max_doc_chunks, dtype=jnp.int32)
  live = valid[..., None] & (offsets < doc_chunks[doc][..., None])
  return doc, doc_local_start[doc][..., None] + offsets, live


def gather_resident(content_k, content_v, doc_index, valid, doc_shard, doc_local_start, doc_chunks,
                    *, mesh, max_doc_chunks: int, batch_axis=None, on_host: bool = False):
  """Device/pinned_host tiers. content_k/v [S·C_s, Hkv, D] sharded over `memory` (in host memory when
  `on_host`); doc_index/valid [B, k] from routing; per-document tables [N] replicated.
  Returns (k̄ [B, k·M, Hkv, D], v̄, mask [B, k·M]) with M = `max_doc_chunks`."""

  def per_shard(ck, cv, doc_index, valid, doc_shard, doc_local_start, doc_chunks):
    doc, rows, live = _selected_rows(doc_index, valid, doc_local_start, doc_chunks, max_doc_chunks)
    mine = live & (doc_shard[doc] == lax.axis_index(MEMORY_AXIS))[..., None]
    b, k, m = rows.shape
    rows = jnp.where(mine, rows, 0).reshape(b, k * m)

    def take(content):
      if on_host and jax.typeof(content).memory_space == jax.memory.Space.Host:
        # gather in host memory space; only the gathered rows move to the device. (A scanned
        # block's slicing of its xs may already have brought the layer to device memory.)
        picked = content.at[jax.device_put(rows, jax.memory.Space.Host)].get(
            mode="promise_in_bounds")
        picked = jax.device_put(picked, jax.memory.Space.Device)
      else:
        picked = content.at[rows].get(mode="promise_in_bounds")
      keep = mine.reshape(b, k * m)[..., None, None]
      return lax.psum(jnp.where(keep, picked, jnp.zeros((), picked.dtype)), MEMORY_AXIS)

    return take(ck), take(cv), live.reshape(b, k * m)

  rows_spec = P(batch_axis)
  return jax.shard_map(per_shard, mesh=mesh,
                       in_specs=(P(MEMORY_AXIS), P(MEMORY_AXIS), rows_spec, rows_spec, P(), P(), P()),
                       out_specs=(rows_spec, rows_spec, rows_spec), check_vma=False)(
                           content_k, content_v, doc_index, valid, doc_shard, doc_local_start,
                           doc_chunks)


def gather_from_store(read_rows: Callable[[str, int, np.ndarray], np.ndarray], doc_chunk_offsets,
                      layer, doc_index, valid, doc_chunks, *, max_doc_chunks: int, row_shape,
                      dtype):
  """Tensorstore tier: one host callback reads exactly the selected documents' rows of router layer
  `layer` (a traced int) with one `read_rows` per array; `doc_chunk_offsets` is the bank's CSR on the
  host, `doc_chunks` [N] the same counts on the device (for the mask). Returns (k̄, v̄, mask) like
  `gather_resident`."""
  offsets = np.asarray(doc_chunk_offsets, np.int64)
  b, k = doc_index.shape
  m = max_doc_chunks

  def fetch(layer, doc_index, valid):
    r = int(layer)
    starts = offsets[doc_index.clip(0)][..., None] + np.arange(m)
    live = valid[..., None] & (starts < offsets[doc_index.clip(0) + 1][..., None])
    out = []
    for name in ("content_k", "content_v"):
      buf = np.zeros((b, k, m) + tuple(row_shape), dtype)
      if live.any():
        buf[live] = read_rows(name, r, starts[live])
      out.append(buf.reshape((b, k * m) + tuple(row_shape)))
    return tuple(out)

  shape = jax.ShapeDtypeStruct((b, k * m) + tuple(row_shape), dtype)
  ck, cv = io_callback(fetch, (shape, shape), layer, doc_index, valid)
  _, _, live = _selected_rows(doc_index, valid, jnp.zeros_like(doc_chunks), doc_chunks, m)
  return ck, cv, live.reshape(b, k * m)
