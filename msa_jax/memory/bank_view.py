"""`BankMemoryView`: the route/gather memory protocol (DESIGN.md, `msa_jax.model.memory_view`) over a
memory bank, so `entry_points.prefill(model, params, prompt, view)` runs against a bank unchanged.

Per router layer, `route` is the exact memory-parallel top-k of `msa_jax.memory.routing` and
`gather` returns a static-size buffer of the winners' chunks: k documents × M chunk slots (M = the
bank's longest document in chunks), masked. With the device and pinned_host tiers, route → gather →
attention of a layer are one compiled program; the tensorstore tier adds one host callback per layer.

The view reads the bank only through the `Bank` API of `msa_jax.memory.bank` (`router_layers`,
`num_docs`, `doc_chunk_offsets`, `read_rows(name, r, rows)`), so any object with that API serves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from msa_jax.config import MSAConfig
from msa_jax.kernels.routing import api
from msa_jax.memory import routing, tiers
from msa_jax.memory.routing import MEMORY_AXIS, ShardPlan
from msa_jax.memory.store import KEY_SCALES
from msa_jax.model import router, router_keys


class _Identity:
  """Compares by identity, so a static field holding a bank never compares arrays."""

  def __init__(self, value):
    self.value = value

  def __eq__(self, other):
    return isinstance(other, _Identity) and other.value is self.value

  def __hash__(self):
    return id(self.value)


@dataclasses.dataclass(frozen=True)
class BankSpec:
  """The static part of a view (part of the jit cache key)."""

  mesh: Any
  num_docs: int
  max_doc_chunks: int
  tier: str
  coupled: bool
  batch_axis: Any
  row_shape: tuple[int, ...]
  content_dtype: str
  store: _Identity | None = None  # the bank, for the tensorstore tier
  routing_kernel: str = "auto"  # `kernels.routing.api.IMPLEMENTATIONS`


@flax.struct.dataclass
class BankLayerMemory:
  """One router layer of a bank view (or a stack of them inside a scanned block).

  router_keys [S·C_s, Hkv, D] prepared (`router_keys.prepare`) in the bank's key dtype, sharded over
  `memory`, with router_key_scale [S·C_s, Hkv] for int8 keys (else None);
  content_k/v the same rows in the content dtype (None for the tensorstore tier); layer: the router
  layer's slot r in the bank; chunk_doc / doc_index: the shard plan's tables (sharded); doc_shard,
  doc_local_start, doc_chunks [N]: where each document lives (replicated).
  """

  router_keys: jax.Array
  router_key_scale: jax.Array | None
  content_k: jax.Array | None
  content_v: jax.Array | None
  layer: jax.Array
  chunk_doc: jax.Array
  doc_index: jax.Array
  doc_shard: jax.Array
  doc_local_start: jax.Array
  doc_chunks: jax.Array
  spec: BankSpec = flax.struct.field(pytree_node=False)

  def route(self, q_r, route_mask, cfg: MSAConfig) -> router.Selection:
    s = self.spec
    scores, index, valid = routing.route_sharded(
        q_r, route_mask, self.router_keys, self.chunk_doc, self.doc_index, cfg, mesh=s.mesh,
        num_docs=s.num_docs, batch_axis=s.batch_axis, coupled_scale=s.coupled,
        key_scale=self.router_key_scale, implementation=s.routing_kernel)
    return router.Selection(index, scores, valid)

  def gather(self, selection: router.Selection):
    """(k̄ [B, k·M, Hkv, D], v̄, mask [B, k·M]): the selected documents' chunks, where they live."""
    s = self.spec
    if s.tier == "tensorstore":
      bank = s.store.value
      return tiers.gather_from_store(
          bank.read_rows, bank.doc_chunk_offsets, self.layer, selection.doc_index,
          selection.valid, self.doc_chunks, max_doc_chunks=s.max_doc_chunks,
          row_shape=s.row_shape, dtype=jnp.dtype(s.content_dtype))
    return tiers.gather_resident(
        self.content_k, self.content_v, selection.doc_index, selection.valid, self.doc_shard,
        self.doc_local_start, self.doc_chunks, mesh=s.mesh, max_doc_chunks=s.max_doc_chunks,
        batch_axis=s.batch_axis, on_host=s.tier == "pinned_host")


_PER_LAYER = ("router_keys", "router_key_scale", "content_k", "content_v", "layer")


@flax.struct.dataclass
class BankMemoryView:
  """All router layers of a bank: the per-layer arrays carry a leading [L_r] axis in
  `router_layers` order; `at(layer)` / `span(start, end)` as in `MemoryView`."""

  layers: BankLayerMemory
  router_layers: tuple[int, ...] = flax.struct.field(pytree_node=False)

  @property
  def spec(self) -> BankSpec:
    return self.layers.spec

  def for_batch(self, batch: int) -> "BankMemoryView":
    """A bank serves every request of a batch as it is."""
    return self

  def serving_problem(self, config) -> str | None:
    """None: `open_view` already checked the bank against the model."""
    return None

  def at(self, layer: int) -> BankLayerMemory:
    r = self.router_layers.index(layer)
    take = lambda x: lax.index_in_dim(x, r, keepdims=False)
    return self.layers.replace(**{f: _map(take, getattr(self.layers, f)) for f in _PER_LAYER})

  def span(self, start: int, end: int) -> BankLayerMemory:
    """Router layers start..end-1 stacked for a scanned block; the shared tables are broadcast
    along the stack (they are ~1/(Hkv·D) of the keys' size)."""
    r0, r1 = self.router_layers.index(start), self.router_layers.index(end - 1) + 1
    take = lambda x: lax.slice_in_dim(x, r0, r1)
    stacked = {f: _map(take, getattr(self.layers, f)) for f in _PER_LAYER}
    shared = {f.name: jnp.broadcast_to(getattr(self.layers, f.name),
                                       (r1 - r0,) + getattr(self.layers, f.name).shape)
              for f in dataclasses.fields(BankLayerMemory)
              if f.name not in _PER_LAYER and f.name != "spec"}
    return self.layers.replace(**stacked, **shared)


def _map(fn, x):
  """Static slices (not gathers), so arrays in a host memory space slice outside jit too."""
  return None if x is None else fn(x)


# --------------------------------------------------------------------------- building a view


def content_footprint(plan: ShardPlan, num_layers: int, row_shape, content_dtype) -> int:
  """Bytes of content K̄+V̄ one memory shard holds."""
  return 2 * num_layers * plan.slots_per_shard * int(np.prod(row_shape)) * np.dtype(
      content_dtype).itemsize


def view_from_arrays(plan: ShardPlan, mesh, router_layers, keys, content_k, content_v, *,
                     tier: str, coupled: bool, batch_axis=None, store=None,
                     key_scale=None, routing_kernel: str = "auto") -> BankMemoryView:
  """A view over arrays already placed on `mesh` (sharded over `memory` along their row axis 1):
  keys [L_r, S·C_s, Hkv, D] prepared router keys (`router_keys.prepare`; int8 with key_scale
  [L_r, S·C_s, Hkv]); content [L_r, S·C_s, Hkv, D] or None (tensorstore tier, which then reads
  through `store.read_rows`); `routing_kernel` picks the routing implementation
  (`kernels.routing.api`)."""
  api.resolve(routing_kernel)  # an unknown name fails here, not at the first request
  if tier not in tiers.TIERS:
    raise routing.RoutingError(f"unknown content tier {tier!r}; expected one of {tiers.TIERS}")
  if (tier == "tensorstore") != (content_k is None):
    raise routing.RoutingError(f"tier {tier!r} {'needs no' if content_k is None else 'needs'} "
                               "resident content arrays")
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  everywhere = lambda x: jax.make_array_from_callback(x.shape, replicated, lambda i: x[i])
  row_shape = tuple(keys.shape[2:])
  if tier == "tensorstore":
    dtype = jnp.dtype(store.read_rows("content_k", 0, np.zeros(1, np.int64)).dtype).name
  else:
    dtype = jnp.dtype(content_k.dtype).name
  spec = BankSpec(mesh, plan.num_docs, plan.max_doc_chunks, tier, coupled, batch_axis, row_shape,
                  dtype, None if store is None else _Identity(store), routing_kernel)
  layers = BankLayerMemory(
      router_keys=keys, router_key_scale=key_scale, content_k=content_k, content_v=content_v,
      layer=everywhere(np.arange(len(router_layers), dtype=np.int32)),
      chunk_doc=routing.place_table(mesh, plan.chunk_doc.reshape(-1)),
      doc_index=routing.place_table(mesh, plan.doc_index.reshape(-1)),
      doc_shard=everywhere(plan.doc_shard), doc_local_start=everywhere(plan.doc_local_start),
      doc_chunks=everywhere(plan.doc_chunks), spec=spec)
  return BankMemoryView(layers, tuple(router_layers))


def place_router_keys(plan: ShardPlan, mesh, read_rows, num_layers: int, row_shape, key_dtype,
                      msa: MSAConfig):
  """Every router layer's keys [L_r, S·C_s, Hkv, D] in `key_dtype`, with scales [L_r, S·C_s, Hkv]
  for int8 (else None), placed over `memory` and prepared for the score mode
  (`router_keys.prepare`). `read_rows(name, r, rows)` reads stored rows (the `Bank` API)."""
  key_dtype = jnp.dtype(key_dtype)
  keys = _place(plan, mesh, read_rows, "router_keys", num_layers, row_shape, key_dtype)
  scale = None
  if router_keys.has_scale(key_dtype):
    scale = _place(plan, mesh, read_rows, KEY_SCALES, num_layers, row_shape[:1], np.float32)
  prepare = jax.jit(lambda k, s: router_keys.prepare(k, s, msa), donate_argnums=(0, 1),
                    out_shardings=jax.tree.map(lambda x: x.sharding, (keys, scale)))
  return prepare(keys, scale)


def _place(plan: ShardPlan, mesh, read_rows, name: str, num_layers: int, row_shape, dtype,
           memory_kind=None) -> jax.Array:
  """Bank array `name` of every router layer, [L_r, S·C_s, *row_shape], placed over `memory`."""
  shape = (num_layers, plan.num_shards * plan.slots_per_shard) + tuple(row_shape)

  def read_shard(s):
    return np.stack([tiers.read_chunk_block(lambda rows: read_rows(name, r, rows), plan, s,
                                            row_shape, dtype) for r in range(num_layers)])

  return tiers.place_rows(plan, mesh, read_shard, shape, dtype, row_axis=1,
                          memory_kind=memory_kind)


def open_view(bank, mesh, msa: MSAConfig, *, tier: str = "auto", batch_axis=None,
              slot_multiple: int = routing.SLOT_MULTIPLE,
              routing_kernel: str = "auto") -> BankMemoryView:
  """Loads a bank onto `mesh` (which has a `memory` axis): router keys on the accelerators, sharded
  by whole documents balanced by chunk count; content in the tier `tier` ("auto": the first of
  device, pinned_host, tensorstore that fits); routing by `routing_kernel`
  (`kernels.routing.api`: "auto" is the fused kernel on GPU and TPU)."""
  if MEMORY_AXIS not in mesh.axis_names:
    raise routing.RoutingError(f"the mesh has no {MEMORY_AXIS!r} axis: {mesh.axis_names}")
  if tuple(bank.router_layers) != tuple(msa.router_layers):
    raise routing.RoutingError(f"the bank was encoded for router layers {list(bank.router_layers)}"
                               f" but the model routes in layers {list(msa.router_layers)}")
  if bank.num_docs == 0:
    raise routing.RoutingError("the bank holds no documents")
  plan = routing.plan_shards(bank.doc_chunk_offsets, mesh.shape[MEMORY_AXIS],
                             slot_multiple=slot_multiple)
  layers = tuple(bank.router_layers)
  probe = bank.read_rows("content_k", 0, np.zeros(1, np.int64))
  row_shape, content_dtype = probe.shape[1:], probe.dtype
  key_dtype = bank.read_rows("router_keys", 0, np.zeros(1, np.int64)).dtype
  device = mesh.devices.flat[0]
  host_kind = tiers.host_memory_kind(device)
  per_shard = content_footprint(plan, len(layers), row_shape, content_dtype)
  key_row = int(np.prod(row_shape)) * key_dtype.itemsize + (
      4 * row_shape[0] if router_keys.has_scale(key_dtype) else 0)
  keys_bytes = len(layers) * plan.slots_per_shard * key_row
  local_shards = len({d for d in mesh.devices.flat if d.process_index == jax.process_index()})
  tier = tiers.choose_tier(per_shard + keys_bytes, per_shard * local_shards,
                           free_device=tiers.free_device_bytes(mesh.devices.flat),
                           free_host=tiers.free_host_bytes(), host_kind=host_kind, forced=tier)
  if jax.process_count() > 1:  # every process must compile the same program: the most cautious
    from jax.experimental import multihost_utils
    chosen = multihost_utils.process_allgather(np.int32(tiers.TIERS.index(tier)))
    tier = tiers.TIERS[int(np.max(chosen))]
  keys, key_scale = place_router_keys(plan, mesh, bank.read_rows, len(layers), row_shape,
                                      key_dtype, msa)
  content_k = content_v = None
  if tier != "tensorstore":
    kind = host_kind if tier == "pinned_host" else None
    content_k, content_v = (_place(plan, mesh, bank.read_rows, name, len(layers), row_shape,
                                   content_dtype, kind) for name in ("content_k", "content_v"))
  return view_from_arrays(plan, mesh, layers, keys, content_k, content_v, tier=tier,
                          coupled=not msa.decouple_router, batch_axis=batch_axis,
                          store=bank if tier == "tensorstore" else None, key_scale=key_scale,
                          routing_kernel=routing_kernel)
