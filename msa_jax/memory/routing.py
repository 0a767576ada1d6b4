"""Exact memory-parallel routing over a bank (DESIGN.md "Memory bank", MSA_PAPER.md §3).

The router keys of all documents lie on the `memory` mesh axis, whole documents per shard, shards
balanced by chunk count and padded to one static size (`plan_shards`). Every shard scores its keys
against the replicated router queries with the math of `msa_jax.model.router` (same reductions, score
modes and coupled scaling), reduces to document scores, and keeps its local top-k (the fused kernel
of `msa_jax.kernels.routing` on GPU and TPU, which never writes a score array); the shards
all-gather k (score, global document index) candidates each, and a global top-k picks the winners.
No shard ever sees another shard's scores, and no [B, C] score matrix over the whole bank exists.

Exactness: this equals `router.route` over all chunks, ties included. `lax.top_k` is stable (the
lower position wins a tie); a shard's local document columns are in ascending global order and the
gathered candidates are sorted by global index before the final top-k, so a tie always goes to the
lower document index, as in single-device routing. Empty slots have score -inf and a sentinel index
past every document, so they never beat a real document, even one scoring -inf.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from msa_jax.config import MSAConfig
from msa_jax.kernels.routing import api
from msa_jax.model import router

MEMORY_AXIS = "memory"
SLOT_MULTIPLE = 256  # chunk slots per shard: whole key tiles for the routing kernels
_NO_DOC = np.iinfo(np.int32).max  # the global index of an empty candidate: past every document


class RoutingError(ValueError):
  """A bank layout or routing request that cannot be served."""


@dataclasses.dataclass(frozen=True, eq=False)
class ShardPlan:
  """Which memory shard holds each document, and where.

  Shard s holds rows [s·C_s, (s+1)·C_s) of every sharded chunk array (C_s = `slots_per_shard`) and
  columns [s·N_s, (s+1)·N_s) of the document tables (N_s = `docs_per_shard`). A shard's documents are
  in ascending global order and their chunks are contiguous.

  doc_shard, doc_local_start, doc_chunks  int32 [N]: shard, first local row, chunk count per document
  chunk_rows  int64 [S, C_s]  the bank row of each local slot (-1 = empty slot)
  chunk_doc   int32 [S, C_s]  the local document column of each slot, 1-based (0 = empty)
  doc_index   int32 [S, N_s]  the global index of each local document column (empty: _NO_DOC)
  """

  num_docs: int
  num_shards: int
  slots_per_shard: int
  docs_per_shard: int
  max_doc_chunks: int
  doc_shard: np.ndarray
  doc_local_start: np.ndarray
  doc_chunks: np.ndarray
  chunk_rows: np.ndarray
  chunk_doc: np.ndarray
  doc_index: np.ndarray


def plan_shards(doc_chunk_offsets, num_shards: int, *,
                slot_multiple: int = SLOT_MULTIPLE) -> ShardPlan:
  """Assigns whole documents to `num_shards` shards, balancing chunk counts (largest document first
  to the least-loaded shard, ties to the lower shard), and pads every shard to the same static number
  of chunk slots (a multiple of `slot_multiple`) and document columns."""
  offsets = np.asarray(doc_chunk_offsets, np.int64)
  if offsets.ndim != 1 or offsets.size < 2 or offsets[0] != 0 or np.any(np.diff(offsets) <= 0):
    raise RoutingError("doc_chunk_offsets must be a CSR offset vector [N+1] starting at 0 with at "
                       f"least one chunk per document; got {offsets[:8]}... (size {offsets.size})")
  if num_shards <= 0:
    raise RoutingError(f"num_shards must be positive, got {num_shards}")
  counts = np.diff(offsets)
  n = counts.size
  doc_shard = np.empty(n, np.int32)
  load = np.zeros(num_shards, np.int64)
  for d in sorted(range(n), key=lambda i: (-counts[i], i)):
    s = int(np.argmin(load))  # argmin returns the lowest shard among equals
    doc_shard[d] = s
    load[s] += counts[d]
  slots = max(1, int(load.max()))
  slots = -(-slots // slot_multiple) * slot_multiple
  per_shard = [np.flatnonzero(doc_shard == s) for s in range(num_shards)]
  docs_per_shard = max(1, max(len(d) for d in per_shard))
  chunk_rows = np.full((num_shards, slots), -1, np.int64)
  chunk_doc = np.zeros((num_shards, slots), np.int32)
  doc_index = np.full((num_shards, docs_per_shard), _NO_DOC, np.int32)
  doc_local_start = np.empty(n, np.int32)
  for s, docs in enumerate(per_shard):
    row = 0
    for col, d in enumerate(docs):
      c = int(counts[d])
      chunk_rows[s, row:row + c] = np.arange(offsets[d], offsets[d + 1])
      chunk_doc[s, row:row + c] = col + 1
      doc_index[s, col] = d
      doc_local_start[d] = row
      row += c
  return ShardPlan(n, num_shards, slots, docs_per_shard, int(counts.max()), doc_shard,
                   doc_local_start, counts.astype(np.int32), chunk_rows, chunk_doc, doc_index)


def place_table(mesh, x: np.ndarray) -> jax.Array:
  """A shard plan's table (`chunk_doc`, `doc_index`, flattened) sharded over `memory`."""
  sharding = jax.sharding.NamedSharding(mesh, P(MEMORY_AXIS))
  return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])


def _local_top_k(q, route_mask, keys, key_scale, chunk_doc, doc_index, cfg: MSAConfig, k: int,
                 implementation: str):
  """One shard: its best min(k, N_s) documents: (scores [B,k'], global indices [B,k'])."""
  top, col, found = api.top_k_documents(q, route_mask, keys, key_scale, chunk_doc,
                                        doc_index.shape[0], cfg, k, implementation=implementation)
  return top, jnp.where(found, doc_index[col], _NO_DOC)


def _global_top_k(scores, index, k: int, num_docs: int):
  """Candidates [B, M] from all shards -> the best k, ties to the lower global index; entries past
  the real documents are marked invalid (index -1, score -inf)."""
  b, m = scores.shape
  if m < k:  # fewer candidates than k in the whole mesh: pad with slots that never win
    scores = jnp.concatenate([scores, jnp.full((b, k - m), -jnp.inf, scores.dtype)], axis=1)
    index = jnp.concatenate([index, jnp.full((b, k - m), _NO_DOC, index.dtype)], axis=1)
  index, scores = lax.sort((index, scores), dimension=1, num_keys=1)  # ascending global index
  top, pos = lax.top_k(scores, k)
  idx = jnp.take_along_axis(index, pos, axis=-1)
  valid = idx < num_docs
  return jnp.where(valid, top, -jnp.inf), jnp.where(valid, idx, -1), valid


def route_sharded(q_r, route_mask, keys, chunk_doc, doc_index, cfg: MSAConfig, *, mesh,
                  num_docs: int, batch_axis: str | tuple[str, ...] | None = None,
                  coupled_scale: bool = False, key_scale=None, implementation: str = "auto"):
  """Top-`cfg.top_k_docs` documents of each request over a sharded bank.

  q_r [B,T,H,D] raw router queries, route_mask [B,T]; keys [S·C_s, Hkv, D] prepared router keys
  (`router_keys.prepare`; int8 keys with key_scale [S·C_s, Hkv]), chunk_doc [S·C_s] and doc_index
  [S·N_s] from the `ShardPlan`, all sharded over `memory`. The batch is replicated, or sharded
  over `batch_axis`. `implementation`: the shard's top-k (`kernels.routing.api`).
  Returns (scores [B,k] f32, doc_index [B,k] int32 (-1 = none), valid [B,k] bool), best first.
  """
  k = cfg.top_k_docs
  q = router.prepare_queries(q_r, cfg, coupled_scale=coupled_scale)

  def per_shard(q, route_mask, chunk_doc, doc_index, keys, key_scale=None):
    top, idx = _local_top_k(q, route_mask, keys, key_scale, chunk_doc, doc_index, cfg, k,
                            implementation)
    top = lax.all_gather(top, MEMORY_AXIS, axis=1, tiled=True)
    idx = lax.all_gather(idx, MEMORY_AXIS, axis=1, tiled=True)
    return _global_top_k(top, idx, k, num_docs)

  rows = P(batch_axis)
  args = (q, route_mask, chunk_doc, doc_index, keys) + (() if key_scale is None else (key_scale,))
  return jax.shard_map(per_shard, mesh=mesh,
                       in_specs=(rows, rows) + (P(MEMORY_AXIS),) * (len(args) - 2),
                       out_specs=(rows, rows, rows), check_vma=False)(*args)
