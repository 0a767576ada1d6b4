"""The fused routing kernel on TPU (Mosaic TPU), tested on CPU in the TPU interpret mode.

Grid (request blocks "parallel", key tiles "arbitrary", token tiles "arbitrary"): Pallas pipelines
the key tiles [Ct, Hkv·D] from HBM into VMEM while the previous one is scored (a key tile stays for
all token tiles of its step), and the token tiles [Hkv·groups, Tt, D] of the request block's
queries, Tt at most QUERY_ROWS rows and QUERY_BYTES per head, so VMEM holds no [Bb·T]-sized block
or score tile however long the prompts. The chunk scores add up over the token tiles in VMEM
scratch; the kept documents and the carried partial document stay in VMEM scratch along the key
tile axis and are written once, after the last tile (`fused` has the math). The shard's chunks are
one partition walked in order by one core; splitting them over a megacore's two TensorCores
(partitions, as on GPU) is left for a TPU session.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from msa_jax.config import MSAConfig
from msa_jax.kernels.routing import fused

BLOCK_CHUNKS = 512
# One token tile's queries per head: 512 rows of D 128 in bf16, so msa-4b's block of 8 requests x
# T 64 is one tile (as before token tiles). A [512, 512] f32 score tile is 1 MiB of VMEM, and the
# double-buffered query block of the head max's 32 heads 8 MiB: with the key tiles, inside the
# 16 MiB a TPU kernel's scoped VMEM has by default.
QUERY_ROWS = 512
QUERY_BYTES = 128 * 1024


def unsupported(keys_shape, keys_dtype, *, interpret: bool, query_heads: int,
                block_chunks: int = BLOCK_CHUNKS) -> str | None:
  """Why this kernel cannot take keys of this shape and dtype on a TPU (None: it can). The query
  operand count (`pallas_gpu.unsupported` bounds shared memory by it) leaves VMEM in budget: every
  head's QUERY_BYTES tile is well inside the 16 MiB."""
  del query_heads
  if interpret:
    return None
  if jax.default_backend() != "tpu":
    return f"pallas_tpu needs a TPU, not {jax.default_backend()}"
  d = keys_shape[-1]
  if d % 128:
    return f"head_dim {d} is not a multiple of 128 (a lane-aligned slice per KV head)"
  if fused.max_query_rows(d, keys_dtype, QUERY_ROWS, QUERY_BYTES) < 16:
    return (f"head_dim {d} leaves fewer than 16 query rows (a bf16 sublane tile) in a "
            f"{QUERY_BYTES // 1024} KiB query tile")
  if fused.tile_size(keys_shape[0], block_chunks) % 128:
    return (f"{keys_shape[0]} chunk slots per shard are not a multiple of 128 (open the view with "
            f"the default slot_multiple)")
  return None


def top_k_documents(q, route_mask, keys, key_scale, chunk_doc, num_docs: int, cfg: MSAConfig,
                    k: int, *, interpret: bool = False, block_chunks: int = BLOCK_CHUNKS,
                    block_rows: int = 8):
  """`reference.top_k_documents`, fused (see the module doc); `interpret` runs it on CPU."""
  ct = fused.tile_size(keys.shape[0], block_chunks)
  spec, ops = fused.layout(q, route_mask, keys, key_scale, chunk_doc, cfg, k,
                           block_rows=min(block_rows, fused.pow2(q.shape[0])), block_chunks=ct,
                           query_rows=QUERY_ROWS, query_bytes=QUERY_BYTES)
  nt, tiles = spec.token_tiles, keys.shape[0] // ct
  nb, width = ops.route.shape[0] // nt, ops.keys.shape[1]
  inputs = [ops.queries, ops.route, ops.keys, ops.chunk_doc]
  in_specs = [pl.BlockSpec((ops.queries.shape[0], spec.token_tile, spec.head_dim),
                           lambda b, t, u, _: (0, b * nt + u, 0)),
              pl.BlockSpec((None, 1, spec.token_tile), lambda b, t, u, _: (b * nt + u, 0, 0)),
              pl.BlockSpec((ct, width), lambda b, t, u, _: (t, 0)),
              pl.BlockSpec((ct, 1), lambda b, t, u, _: (t, 0))]
  if spec.scaled:
    inputs.append(ops.scale)
    in_specs.append(pl.BlockSpec((ct, spec.kv_heads), lambda b, t, u, _: (t, 0)))
  if spec.chunk_reduce == "mean":
    inputs.append(ops.chunk_doc_row)
    in_specs.append(pl.BlockSpec((1, ct), lambda b, t, u, _: (0, t)))
  kept = (spec.keep, spec.block_rows)
  out_shape = [jax.ShapeDtypeStruct((1, nb) + kept, jnp.float32),
               jax.ShapeDtypeStruct((1, nb) + kept, jnp.int32)]
  out_spec = pl.BlockSpec((None, None) + kept, lambda b, t, u, _: (0, b, 0, 0))
  scratch = [pltpu.VMEM(x.shape, x.dtype) for x in (fused.no_scores(spec),
                                                    *fused.init_state(spec))]
  values, columns = pl.pallas_call(
      functools.partial(_kernel, spec),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(nb, tiles, nt), in_specs=in_specs,
          out_specs=[out_spec, out_spec], scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False,
  )(ops.continues, *inputs)
  return fused.merge(values, columns, q.shape[0], min(k, num_docs))


def _kernel(spec: fused.Spec, continues_ref, queries_ref, route_ref, keys_ref, chunk_doc_ref,
            *refs):
  refs = list(refs)
  scale_ref = refs.pop(0) if spec.scaled else None
  row_ref = refs.pop(0) if spec.chunk_reduce == "mean" else None
  values_ref, columns_ref, scores_ref, *state_refs = refs
  t, u = pl.program_id(1), pl.program_id(2)
  d = spec.head_dim

  @pl.when((t == 0) & (u == 0))
  def _():
    for ref, x in zip(state_refs, fused.init_state(spec)):
      ref[...] = x

  @pl.when(u == 0)
  def _():
    scores_ref[...] = fused.no_scores(spec)

  scores_ref[...] = fused.add_token_tile(
      scores_ref[...], spec, u,
      load_keys=lambda j: keys_ref[:, j * d:(j + 1) * d],
      load_scale=lambda j: scale_ref[:, j:j + 1],
      load_queries=lambda i: queries_ref[i], route=route_ref[...])

  @pl.when(u == spec.token_tiles - 1)
  def _():
    chunk_doc = chunk_doc_ref[...]
    state = fused.tile_step(
        fused.State(*(ref[...] for ref in state_refs)), spec, scores_ref[...],
        chunk_doc=chunk_doc, chunk_doc_row=None if row_ref is None else row_ref[...],
        live=chunk_doc > 0, continues=continues_ref[t])
    for ref, x in zip(state_refs, state):
      ref[...] = x

    @pl.when(t == pl.num_programs(1) - 1)
    def _():
      values_ref[...] = state.values
      columns_ref[...] = state.columns
