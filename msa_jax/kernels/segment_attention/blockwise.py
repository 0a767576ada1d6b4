"""Blockwise (flash-style) segment attention in XLA, with a memory-light custom VJP.

The masking rule is `reference.segment_mask`'s.
Scores never exist beyond one [block_q, block_kv] tile per head; key blocks that no query of a query
block can see (decided from per-block segment and index ranges) are skipped with `lax.cond`, so a
64K-token row of 1K-token documents costs ~S·1K, not S². The backward pass recomputes tiles from the
saved log-sum-exp (FlashAttention-2), so memory stays O(S) in both directions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from msa_jax.kernels.segment_attention.reference import segment_mask

_BIG = 1e30


def _pad_to(x, n, axis, value=0):
  pad = n - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _block_ranges(seg, idx, block):
  """Per row and block: min/max non-zero segment, min/max idx of non-zero entries ([B, n] each)."""
  b, s = seg.shape
  seg = seg.reshape(b, s // block, block)
  idx = idx.reshape(b, s // block, block)
  live = seg != 0
  big = jnp.int32(2**30)
  seg_lo = jnp.min(jnp.where(live, seg, big), axis=2)
  seg_hi = jnp.max(jnp.where(live, seg, -big), axis=2)
  idx_lo = jnp.min(jnp.where(live, idx, big), axis=2)
  idx_hi = jnp.max(jnp.where(live, idx, -big), axis=2)
  return seg_lo, seg_hi, idx_lo, idx_hi


def _needed_tiles(q_seg, q_idx, kv_seg, kv_idx, block_q, block_kv):
  """[nq, nk] bool: whether, in some row, a query of block i may see a key of block j
  (conservative). Ranges are taken per row, then OR-ed over the batch: rows of packed documents
  have their boundaries in different places, and ranges merged over the batch would overlap
  almost everywhere (a 2K row of <=72-token documents in 128-token tiles: 46 tiles of 256 per row
  instead of 102)."""
  qs_lo, qs_hi, _, qi_hi = _block_ranges(q_seg, q_idx, block_q)
  ks_lo, ks_hi, ki_lo, _ = _block_ranges(kv_seg, kv_idx, block_kv)
  overlap = (qs_lo[:, :, None] <= ks_hi[:, None, :]) & (ks_lo[:, None, :] <= qs_hi[:, :, None])
  return jnp.any(overlap & (ki_lo[:, None, :] <= qi_hi[:, :, None]), axis=0)


_tile_mask = segment_mask


def _live_range(needed_row):
  """[lo, hi) covering every needed tile of a row of the tile grid (empty when none is needed):
  loops run only over this range, so a long row of short documents costs ~S·doc_len, not S²."""
  n = needed_row.shape[0]
  any_needed = jnp.any(needed_row)
  lo = jnp.where(any_needed, jnp.argmax(needed_row), 0)
  hi = jnp.where(any_needed, n - jnp.argmax(needed_row[::-1]), 0)
  return lo, hi


def _scores(qb, kb, mask, scale):
  """qb [B,bq,Hkv,G,D], kb [B,bk,Hkv,D] -> f32 [B,Hkv,G,bq,bk], masked entries -BIG."""
  s = jnp.einsum("bqkgd,btkd->bkgqt", qb, kb, preferred_element_type=jnp.float32) * scale
  return jnp.where(mask[:, None, None], s, -_BIG)


def _init_carry(b, hkv, g, bq, d):
  """The online softmax's empty state (running max, sum, output) for [B,Hkv,G,bq] queries."""
  return (jnp.full((b, hkv, g, bq), -_BIG, jnp.float32), jnp.zeros((b, hkv, g, bq), jnp.float32),
          jnp.zeros((b, hkv, g, bq, d), jnp.float32))


def _online_step(carry, qb, kb, vb, mask, scale):
  """Folds one key tile (kb/vb [B,bk,Hkv,D], mask [B,bq,bk]) into the online softmax state."""
  m, l, acc = carry
  s = _scores(qb, kb, mask, scale)
  m_new = jnp.maximum(m, jnp.max(s, axis=-1))
  p = jnp.where(mask[:, None, None], jnp.exp(s - m_new[..., None]), 0.0)
  corr = jnp.exp(m - m_new)
  l = l * corr + jnp.sum(p, axis=-1)
  pv = jnp.einsum("bkgqt,btkd->bkgqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
  return m_new, l, acc * corr[..., None] + pv


def _finish(m, l, acc):
  """out [B,Hkv,G,bq,D] and lse [B,Hkv,G,bq] (f32) from the state; queries that saw nothing get
  zeros and lse -BIG, never NaN."""
  seen = l > 0
  out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -_BIG)
  return out, lse


def _tile_grads(qb, kb, vb, dob, lse_b, delta_b, mask, scale):
  """p and ds of one tile, both f32 [B,Hkv,G,bq,bk], recomputed from the saved log-sum-exp:
  qb/dob [B,bq,Hkv,G,D], kb/vb [B,bk,Hkv,D], lse_b/delta_b [B,bq,Hkv,G], mask [B,bq,bk]."""
  s = _scores(qb, kb, mask, scale)
  lse_t = jnp.transpose(lse_b, (0, 2, 3, 1))[..., None]
  p = jnp.where(mask[:, None, None], jnp.exp(s - lse_t), 0.0)
  dp = jnp.einsum("bqkgd,btkd->bkgqt", dob, vb, preferred_element_type=jnp.float32)
  ds = p * (dp - jnp.transpose(delta_b, (0, 2, 3, 1))[..., None])
  return p, ds


def _dq(ds, kb, scale):
  """A tile's dq [B,bq,Hkv,G,D] (f32)."""
  return jnp.einsum("bkgqt,btkd->bqkgd", ds.astype(kb.dtype), kb,
                    preferred_element_type=jnp.float32) * scale


def _dkv(p, ds, qb, dob, scale):
  """A tile's dk, dv [B,bk,Hkv,D] (f32)."""
  dv = jnp.einsum("bkgqt,bqkgd->btkd", p.astype(dob.dtype), dob, preferred_element_type=jnp.float32)
  dk = jnp.einsum("bkgqt,bqkgd->btkd", ds.astype(qb.dtype), qb,
                  preferred_element_type=jnp.float32) * scale
  return dk, dv


def _prepare(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block_q, block_kv):
  q, k, v, q_seg, q_idx, kv_seg, kv_idx = map(jnp.asarray, (q, k, v, q_seg, q_idx, kv_seg, kv_idx))
  b, sq, h, d = q.shape
  skv, hkv = k.shape[1], k.shape[2]
  nq, nk = -(-sq // block_q), -(-skv // block_kv)
  q = _pad_to(q, nq * block_q, 1).reshape(b, nq, block_q, hkv, h // hkv, d)
  k = _pad_to(k, nk * block_kv, 1).reshape(b, nk, block_kv, hkv, d)
  v = _pad_to(v, nk * block_kv, 1).reshape(b, nk, block_kv, hkv, d)
  q_seg = _pad_to(q_seg, nq * block_q, 1)
  q_idx = _pad_to(q_idx, nq * block_q, 1)
  kv_seg = _pad_to(kv_seg, nk * block_kv, 1)
  kv_idx = _pad_to(kv_idx, nk * block_kv, 1)
  needed = _needed_tiles(q_seg, q_idx, kv_seg, kv_idx, block_q, block_kv)
  q_seg, q_idx = q_seg.reshape(b, nq, block_q), q_idx.reshape(b, nq, block_q)
  kv_seg, kv_idx = kv_seg.reshape(b, nk, block_kv), kv_idx.reshape(b, nk, block_kv)
  return q, k, v, q_seg, q_idx, kv_seg, kv_idx, needed


def _forward(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block_q, block_kv):
  """Returns out [B,Sq,H,D] (q.dtype) and lse [B,Sq,Hkv,G] (f32; -BIG for rows that see nothing)."""
  b, sq, h, d = q.shape
  scale = 1.0 / jnp.sqrt(jnp.float32(d))
  qb_all, kb_all, vb_all, qs_all, qi_all, ks_all, ki_all, needed = _prepare(
      q, k, v, q_seg, q_idx, kv_seg, kv_idx, block_q, block_kv)
  hkv, g = qb_all.shape[3], qb_all.shape[4]

  def q_block(args):
    qb, qs, qi, need_row = args

    def kv_step(j, carry):
      def compute(carry):
        mask = _tile_mask(qs, qi, ks_all[:, j], ki_all[:, j])
        return _online_step(carry, qb, kb_all[:, j], vb_all[:, j], mask, scale)

      return lax.cond(need_row[j], compute, lambda c: c, carry)

    carry = lax.fori_loop(*_live_range(need_row), kv_step, _init_carry(b, hkv, g, block_q, d))
    return _finish(*carry)

  xs = (jnp.moveaxis(qb_all, 1, 0), jnp.moveaxis(qs_all, 1, 0), jnp.moveaxis(qi_all, 1, 0), needed)
  out, lse = lax.map(q_block, xs)  # [nq, B, Hkv, G, bq, (D)]
  out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(b, -1, h, d)[:, :sq]
  lse = jnp.transpose(lse, (1, 0, 4, 2, 3)).reshape(b, -1, hkv, g)[:, :sq]
  return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def segment_attention(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block_q=512, block_kv=512):
  """q [B,Sq,H,D], k/v [B,Skv,Hkv,D] (query head h uses KV head h // (H/Hkv)); int32 q_seg/q_idx
  [B,Sq], kv_seg/kv_idx [B,Skv]. Returns [B,Sq,H,D]; a query that may see nothing gets zeros."""
  return _forward(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block_q, block_kv)[0]


def _fwd(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block_q, block_kv):
  out, lse = _forward(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block_q, block_kv)
  return out, (q, k, v, q_seg, q_idx, kv_seg, kv_idx, out, lse)


def _bwd(block_q, block_kv, res, dout):
  q, k, v, q_seg, q_idx, kv_seg, kv_idx, out, lse = res
  b, sq, h, d = q.shape
  skv = k.shape[1]
  scale = 1.0 / jnp.sqrt(jnp.float32(d))
  qb_all, kb_all, vb_all, qs_all, qi_all, ks_all, ki_all, needed = _prepare(
      q, k, v, q_seg, q_idx, kv_seg, kv_idx, block_q, block_kv)
  hkv, g = qb_all.shape[3], qb_all.shape[4]
  nq, nk = qb_all.shape[1], kb_all.shape[1]
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B,Sq,H]
  do_all = _pad_to(dout, nq * block_q, 1).reshape(b, nq, block_q, hkv, g, d)
  delta_all = _pad_to(delta, nq * block_q, 1).reshape(b, nq, block_q, hkv, g)
  lse_all = _pad_to(lse, nq * block_q, 1, value=-_BIG).reshape(b, nq, block_q, hkv, g)

  def tile(i, j):
    """p and ds of tile (i, j), both f32 [B,Hkv,G,bq,bk]."""
    mask = _tile_mask(qs_all[:, i], qi_all[:, i], ks_all[:, j], ki_all[:, j])
    return _tile_grads(qb_all[:, i], kb_all[:, j], vb_all[:, j], do_all[:, i], lse_all[:, i],
                       delta_all[:, i], mask, scale)

  def dq_block(i):
    def step(j, acc):
      def compute(acc):
        _, ds = tile(i, j)
        return acc + _dq(ds, kb_all[:, j], scale)
      return lax.cond(needed[i, j], compute, lambda a: a, acc)
    return lax.fori_loop(*_live_range(needed[i]), step,
                         jnp.zeros((b, block_q, hkv, g, d), jnp.float32))

  def dkv_block(j):
    def step(i, carry):
      def compute(carry):
        dk, dv = carry
        ddk, ddv = _dkv(*tile(i, j), qb_all[:, i], do_all[:, i], scale)
        return dk + ddk, dv + ddv
      return lax.cond(needed[i, j], compute, lambda c: c, carry)
    zeros = jnp.zeros((b, block_kv, hkv, d), jnp.float32)
    return lax.fori_loop(*_live_range(needed[:, j]), step, (zeros, zeros))

  dq = lax.map(dq_block, jnp.arange(nq))
  dk, dv = lax.map(dkv_block, jnp.arange(nk))
  dq = jnp.moveaxis(dq, 0, 1).reshape(b, -1, h, d)[:, :sq].astype(q.dtype)
  dk = jnp.moveaxis(dk, 0, 1).reshape(b, -1, hkv, d)[:, :skv].astype(k.dtype)
  dv = jnp.moveaxis(dv, 0, 1).reshape(b, -1, hkv, d)[:, :skv].astype(v.dtype)
  return dq, dk, dv, None, None, None, None


segment_attention.defvjp(_fwd, _bwd)
