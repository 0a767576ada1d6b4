"""Rewrites our segment masks as masks kept kernels take: a plain causal mask over one sequence.

cuDNN (through `jax.nn.dot_product_attention`) and splash take a causal mask that is fixed by
position, not our per-token `(seg, idx)` rule. Both streams fit it after a per-row permutation,
because the keys are [m memory keys | the queries' own tokens]:

  * order the live keys by idx, a memory key before the prompt token of equal idx (it sits at the
    first memory-seeing index and that token sees it), and move dead keys to the tail;
  * put each query at its own key's place; memory-key places get a zero query (output dropped).

Causal over that order is exactly the reference mask when every row has one segment, the tail of
the keys is the queries' own tokens and live idx increase along the row. The official packed
layout [template head | chunks | rest of the prompt] is this order. Whether a batch satisfies
it is data, so `ok` is computed on device and the callers `lax.cond` to the blockwise fallback.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class CausalLayout:
  """key_order [B,L]: source key of each place; q_src [B,L]: source query of each place (-1: a
  memory key's place); q_place [B,Sq]: each query's place; length [B]: live places (a prefix);
  query_live [B,Sq]; ok: scalar bool, whether causal over this layout equals the reference."""

  key_order: jax.Array
  q_src: jax.Array
  q_place: jax.Array
  length: jax.Array
  query_live: jax.Array
  ok: jax.Array


def increasing_where_live(seg, idx):
  """[B] bool: idx strictly increases along the row over the tokens with seg != 0."""
  live = seg != 0
  low = jnp.iinfo(jnp.int32).min
  seen = jax.lax.cummax(jnp.where(live, idx, low), axis=1)
  before = jnp.concatenate([jnp.full_like(seen[:, :1], low), seen[:, :-1]], axis=1)
  return jnp.all(~live | (idx > before), axis=1)


def causal_layout(q_seg, q_idx, kv_seg, kv_idx) -> CausalLayout:
  """The permutation above; needs Skv >= Sq (static)."""
  b, sq = q_seg.shape
  skv = kv_seg.shape[1]
  m = skv - sq
  if m < 0:
    raise ValueError(f"causal_layout needs at least as many keys as queries, got {skv} < {sq}")
  row_seg = jnp.max(q_seg, axis=1, keepdims=True)  # the row's one segment (0: empty row)
  one_segment = jnp.all((q_seg == 0) | (q_seg == row_seg), axis=1)
  own_tail = jnp.all((kv_seg[:, m:] == q_seg) & (kv_idx[:, m:] == q_idx), axis=1)
  ok = jnp.all(one_segment & own_tail & increasing_where_live(q_seg, q_idx))

  key_live = (kv_seg == row_seg) & (row_seg != 0)
  is_prompt = (jnp.arange(skv) >= m).astype(jnp.int32)
  rank = jnp.where(key_live, 2 * kv_idx.astype(jnp.int32) + is_prompt, jnp.iinfo(jnp.int32).max)
  key_order = jnp.argsort(rank, axis=1, stable=True).astype(jnp.int32)
  place_of_key = jnp.argsort(key_order, axis=1).astype(jnp.int32)
  q_src = jnp.where(key_order >= m, key_order - m, -1)
  return CausalLayout(key_order=key_order, q_src=q_src, q_place=place_of_key[:, m:],
                      length=jnp.sum(key_live, axis=1, dtype=jnp.int32),
                      query_live=(q_seg == row_seg) & (q_seg != 0), ok=ok)


def _take_rows(x, index):
  """x [B,S,...] gathered along S by index [B,L]."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def to_layout(layout: CausalLayout, q, k, v):
  """q, k, v in the layout's order: [B,L,H,D], [B,L,Hkv,D] twice."""
  qp = _take_rows(q, jnp.maximum(layout.q_src, 0))
  qp = jnp.where((layout.q_src >= 0)[:, :, None, None], qp, jnp.zeros_like(qp))
  return qp, _take_rows(k, layout.key_order), _take_rows(v, layout.key_order)


def from_layout(layout: CausalLayout, out):
  """Attention output in the layout's order [B,L,H,D] back to the queries' [B,Sq,H,D]; queries
  that see nothing get zeros (the reference's rule), whatever the kernel wrote there."""
  got = _take_rows(out, layout.q_place)
  return jnp.where(layout.query_live[:, :, None, None], got, jnp.zeros_like(got))
