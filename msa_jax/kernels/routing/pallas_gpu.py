"""The fused routing kernel on NVIDIA GPUs, through Pallas' Triton backend; tested on CPU in
interpret mode (and lowered for CUDA in the tests).

Triton, not Mosaic GPU: Mosaic GPU's Pallas lowering in JAX 0.10 has no `dot_general` on values
("Unimplemented primitive in Pallas Mosaic GPU lowering: dot_general", checked on this kernel): its
matmuls are `plgpu.wgmma` into accumulator refs, with warpgroup semantics, and its interpreter is a
private API, while this kernel's per-tile reductions and top-k rounds are value code. A Mosaic GPU
port (wgmma over key tiles from `emit_pipeline`) is work for a session with a GPU.

Grid (request blocks, partitions): a partition is a run of whole documents of about C/P chunks, so
the P programs of a request block stream disjoint key ranges in parallel, one SM each, and each
keeps its own K best; `fused.merge` takes the best k of the P·K. A program loops over its key tiles
(Triton pipelines the loads) and, within each, over the request block's token tiles of at most
QUERY_ROWS query rows and QUERY_BYTES per head: every matmul operand and the [Ct, Tt] score tile
are bounded whatever T and the block (a whole [Bb·T, D] query operand overran the shared memory
on an H100 at Bb·T = 2048, D = 32; wide operands take fewer rows, `query_rows`); `fused` has the
math.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from msa_jax.config import MSAConfig
from msa_jax.kernels.routing import fused
from msa_jax.model import router_keys

BLOCK_CHUNKS = 64
# One matmul's queries: the msa-4b shape the kernel was benchmarked at (4 requests x T 64 of D 128
# in bf16) is 256 rows, 64 KiB: its [64, 256] f32 score tile is 128 registers a thread over 4 warps,
# and the query tile, a key tile and Triton's second pipeline stage of each stay well inside the
# 227 KiB of shared memory an H100 block may take.
QUERY_ROWS = 256
QUERY_BYTES = 64 * 1024
# Triton stages a key tile's score matmuls through shared memory at once: every KV head's key tile,
# every query operand (one per KV head for the head mean, whose queries are pre-summed over the
# group; one per query head for the head max), and two [Ct, rows] float32 score buffers.
# Measured (2026-12-07; 8 requests x 2048 tokens, 8/4 heads of 32, Ct 64): float32 keys, head mean,
# asked 295,936 bytes at 256 query rows (H200) and ran at 128; bf16 keys, head max, asked 279,552
# at 256 (H100) and float32 keys, head max, ran at 128; D 128 x 8 KV float32 keys asked 524,288 at
# 64 rows and 786,944 at 128 (H200). `shared_bytes` gives the first two exactly and bounds the
# others from above; token tiles shrink until it fits.
SHARED_MEMORY = 232448  # bytes a block may take on an H100/H200
PARTITIONS = 132  # one program per SM of an H100/H200 for a batch-1 request block


def unsupported(keys_shape, keys_dtype, *, interpret: bool, query_heads: int,
                block_chunks: int = BLOCK_CHUNKS) -> str | None:
  """Why this kernel cannot take keys of this shape and dtype on a GPU (None: it can);
  `query_heads`: its query operands per key tile (`fused.query_operands`)."""
  if interpret:
    return None
  if jax.default_backend() != "gpu":
    return f"pallas_gpu needs a GPU, not {jax.default_backend()}"
  d = keys_shape[-1]
  if d < 16 or d & (d - 1):
    return f"head_dim {d} is not a power of two >= 16 (Triton's dot)"
  if fused.max_query_rows(d, keys_dtype, QUERY_ROWS, QUERY_BYTES) < 16:
    return (f"head_dim {d} leaves fewer than 16 query rows (Triton's dot) in a "
            f"{QUERY_BYTES // 1024} KiB query tile")
  ct = fused.tile_size(keys_shape[0], block_chunks)
  if ct < 16:
    return (f"{keys_shape[0]} chunk slots per shard are not a multiple of 16 (open the view with "
            f"the default slot_multiple)")
  if query_rows(keys_shape, keys_dtype, ct, query_heads) < 16:
    return (f"{jnp.dtype(keys_dtype).name} keys of {keys_shape[1]} KV heads x {d} with "
            f"{query_heads} query operands need more than {SHARED_MEMORY} bytes of shared "
            f"memory for 16 query rows (use bf16 keys or the head mean)")
  return None


def shared_bytes(kv_heads: int, query_heads: int, head_dim: int, itemsize: int,
                 block_chunks: int, rows: int) -> int:
  """Shared memory a key tile's score matmuls take with `rows` query rows (see SHARED_MEMORY):
  key and query operands of `itemsize` bytes, two float32 score buffers, and 1 KiB."""
  operands = itemsize * (block_chunks * kv_heads + rows * query_heads) * head_dim
  return operands + 2 * 4 * block_chunks * rows + 1024


def query_rows(keys_shape, keys_dtype, block_chunks: int, query_heads: int) -> int:
  """Query rows per score matmul: QUERY_ROWS, halved until the tile fits SHARED_MEMORY (0 when
  not even 16 do)."""
  _, kv_heads, head_dim = keys_shape
  itemsize = jnp.dtype(router_keys.query_dtype(keys_dtype)).itemsize
  rows = QUERY_ROWS
  while rows >= 16 and shared_bytes(kv_heads, query_heads, head_dim, itemsize, block_chunks,
                                    rows) > SHARED_MEMORY:
    rows //= 2
  return rows if rows >= 16 else 0


def partition_bounds(chunk_doc, parts: int):
  """[parts + 1] chunk indices splitting chunk_doc [C] into runs of whole documents: bound p is
  the first document start at or after p·C/parts (C past the last)."""
  c = chunk_doc.shape[0]
  starts = jnp.concatenate([jnp.ones(1, bool), chunk_doc[1:] != chunk_doc[:-1]])
  next_start = lax.cummin(jnp.where(starts, jnp.arange(c), c), reverse=True)
  targets = jnp.arange(parts + 1) * c // parts
  return jnp.where(targets < c, next_start[jnp.minimum(targets, c - 1)], c).astype(jnp.int32)


def top_k_documents(q, route_mask, keys, key_scale, chunk_doc, num_docs: int, cfg: MSAConfig,
                    k: int, *, interpret: bool = False, block_chunks: int = BLOCK_CHUNKS,
                    block_rows: int = 4, partitions: int = PARTITIONS):
  """`reference.top_k_documents`, fused (see the module doc); `interpret` runs it on CPU."""
  c = keys.shape[0]
  ct = fused.tile_size(c, block_chunks)
  rows = min(block_rows, fused.pow2(q.shape[0]))
  if cfg.chunk_reduce == "mean":
    rows = 16  # the same-document sums are a dot with the request block as N: Triton's minimum
  spec, ops = fused.layout(q, route_mask, keys, key_scale, chunk_doc, cfg, k, block_rows=rows,
                           block_chunks=ct,
                           # interpret mode skips `unsupported`: 16 rows at least there
                           query_rows=max(16, query_rows(keys.shape, keys.dtype, ct,
                                                         fused.query_operands(q.shape[2],
                                                                              keys.shape[1], cfg))),
                           query_bytes=QUERY_BYTES)
  parts = max(1, min(partitions, c // ct))
  nb = ops.route.shape[0] // spec.token_tiles
  inputs = [partition_bounds(chunk_doc, parts), ops.continues, ops.queries, ops.route, ops.keys,
            ops.chunk_doc] + [x for x in (ops.scale, ops.chunk_doc_row) if x is not None]
  whole = pl.BlockSpec()  # the whole array: the kernel indexes it itself
  in_specs = [whole] * len(inputs)
  kept = (spec.keep, spec.block_rows)
  out_spec = pl.BlockSpec((None, None) + kept, lambda b, p: (p, b, 0, 0))
  values, columns = pl.pallas_call(
      functools.partial(_kernel, spec),
      grid=(nb, parts), in_specs=in_specs, out_specs=[out_spec, out_spec],
      out_shape=[jax.ShapeDtypeStruct((parts, nb) + kept, jnp.float32),
                 jax.ShapeDtypeStruct((parts, nb) + kept, jnp.int32)],
      compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
  )(*inputs)
  return fused.merge(values, columns, q.shape[0], min(k, num_docs))


def _kernel(spec: fused.Spec, bounds_ref, continues_ref, queries_ref, route_ref, keys_ref,
            chunk_doc_ref, *refs):
  refs = list(refs)
  scale_ref = refs.pop(0) if spec.scaled else None
  row_ref = refs.pop(0) if spec.chunk_reduce == "mean" else None
  values_ref, columns_ref = refs
  b, p = pl.program_id(0), pl.program_id(1)
  lo, hi = bounds_ref[p], bounds_ref[p + 1]
  ct, d, tt, nt = spec.block_chunks, spec.head_dim, spec.token_tile, spec.token_tiles

  def step(t, state):
    rows = pl.ds(pl.multiple_of(t * ct, ct), ct)

    def token_tile(u, scores):
      tokens = pl.ds(pl.multiple_of((b * nt + u) * tt, tt), tt)
      return fused.add_token_tile(
          scores, spec, u,
          load_keys=lambda j: keys_ref[rows, pl.ds(j * d, d)],
          load_scale=lambda j: scale_ref[rows, pl.ds(j, 1)],
          load_queries=lambda i: queries_ref[i, tokens, :], route=route_ref[b * nt + u])

    scores = lax.fori_loop(0, nt, token_tile, fused.no_scores(spec))
    chunk_doc = chunk_doc_ref[rows, :]
    index = t * ct + lax.broadcasted_iota(jnp.int32, (ct, 1), 0)
    return fused.tile_step(
        state, spec, scores, chunk_doc=chunk_doc,
        chunk_doc_row=None if row_ref is None else row_ref[:, rows],
        live=(chunk_doc > 0) & (index >= lo) & (index < hi), continues=continues_ref[t])

  state = lax.fori_loop(lo // ct, (hi + ct - 1) // ct, step, fused.init_state(spec))
  values_ref[...] = state.values
  columns_ref[...] = state.columns
