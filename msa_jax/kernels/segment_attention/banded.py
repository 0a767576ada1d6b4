"""Banded segment self-attention: loop-free, for rows packed with short documents.

The masking rule is `reference.segment_mask`'s; queries and keys have the same length S. S is cut
into blocks of `block` tokens and query block i attends only to the keys of blocks i-1, i, i+1 (a
window of 3·block keys, zero-padded with segment 0 past the row's ends), with the exact mask on that
window. Every block is computed at once: one [B, n, H, block, 3·block] score array, no loop, no
`lax.cond`, so on a GPU a call has no per-tile predicate to copy to the host (blockwise's per-tile
`lax.cond` and dynamic-trip loops need one each).

This is exact iff every visible (query, key) pair lies in the window. `band_is_exact` decides a
sufficient condition on device from blockwise's conservative per-row tile test, and
`band_or_blockwise` runs the band behind one `lax.cond` per call, blockwise otherwise.

Memory: the custom VJP saves only the output and the log-sum-exp (like blockwise) and recomputes the
window's scores in the backward, so no [B, n, H, block, 3·block] probabilities are kept as residuals;
the score array exists transiently (`window_bytes`), in the forward and again in the backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from msa_jax.kernels.segment_attention import blockwise
from msa_jax.kernels.segment_attention.reference import segment_mask

BAND_BUDGET_BYTES = 1 << 30
"""Largest transient window score array (`window_bytes`) the automatic dispatch lets the band use.

`band_or_blockwise` holds the band and blockwise behind one `lax.cond`, and the untaken branch's
buffers still count in XLA's memory plan: a shape on which the band is (almost) never exact, such as
msa-4b rows of 1K-token documents (one 64K row, 32 heads, 512-token blocks: 12 GiB of window
scores), must not pay for it, so above this budget only blockwise is compiled. The tiny training
model (batch 64, 2K rows, 4 heads, 128-token blocks: 768 MiB) fits. The backward holds a few arrays
of this size at once (scores, probabilities, their gradient) unless XLA fuses them."""


def _offsets(n):
  """Which neighbouring blocks a query block's window holds: i-1, i, i+1 (only i when n == 1)."""
  return tuple(o for o in (-1, 0, 1) if abs(o) < n)


def window_bytes(q_shape, block: int) -> int:
  """Bytes of the float32 window scores [B, n, H, block, window] for queries of q_shape."""
  b, s, h = q_shape[:3]
  n = -(-s // block)
  return b * n * block * h * len(_offsets(n)) * block * 4


def band_is_exact(q_seg, q_idx, kv_seg, kv_idx, block: int):
  """Scalar bool: no row has a visible (query, key) pair outside the band, by
  `blockwise._needed_tiles` (per-row conservative, OR-ed over the batch): False on every tile
  (i, j) with |i - j| >= 2. Sufficient, not necessary."""
  q_seg, q_idx, kv_seg, kv_idx = map(jnp.asarray, (q_seg, q_idx, kv_seg, kv_idx))
  s = q_seg.shape[1]
  if kv_seg.shape[1] != s:
    raise ValueError(f"the band needs as many keys as queries, got {kv_seg.shape[1]} != {s}")
  n = -(-s // block)
  pad = lambda x: blockwise._pad_to(x, n * block, 1)
  needed = blockwise._needed_tiles(pad(q_seg), pad(q_idx), pad(kv_seg), pad(kv_idx), block, block)
  i = jnp.arange(n)
  far = jnp.abs(i[:, None] - i[None, :]) >= 2
  return ~jnp.any(needed & far)


def _windows(x, n, offsets):
  """x [B, n·block, ...] -> [B·n, len(offsets)·block, ...]: block i's row holds blocks i+o, o in
  offsets, zeros past the ends (segment 0 for seg/idx)."""
  b, block, rest = x.shape[0], x.shape[1] // n, x.shape[2:]
  xb = x.reshape(b, n, block, *rest)
  xp = jnp.pad(xb, [(0, 0), (1, 1)] + [(0, 0)] * (xb.ndim - 2))
  w = jnp.concatenate([xp[:, 1 + o:1 + o + n] for o in offsets], axis=2)
  return w.reshape(b * n, len(offsets) * block, *rest)


def _prepare(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block):
  """Query blocks and their key windows, batch and block flattened together:
  qb [B·n, block, Hkv, G, D], kw/vw [B·n, W, Hkv, D], mask [B·n, block, W]."""
  q, k, v, q_seg, q_idx, kv_seg, kv_idx = map(jnp.asarray, (q, k, v, q_seg, q_idx, kv_seg, kv_idx))
  b, s, h, d = q.shape
  hkv = k.shape[2]
  n = -(-s // block)
  offsets = _offsets(n)
  pad = lambda x: blockwise._pad_to(x, n * block, 1)
  qb = pad(q).reshape(b * n, block, hkv, h // hkv, d)
  kw, vw = _windows(pad(k), n, offsets), _windows(pad(v), n, offsets)
  qs, qi = pad(q_seg).reshape(b * n, block), pad(q_idx).reshape(b * n, block)
  ks, ki = _windows(pad(kv_seg), n, offsets), _windows(pad(kv_idx), n, offsets)
  return qb, kw, vw, segment_mask(qs, qi, ks, ki)


def _forward(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block):
  """out [B,S,H,D] (q.dtype) and lse [B,S,Hkv,G] (f32; -BIG for queries that see nothing), laid
  out as blockwise's."""
  b, s, h, d = q.shape
  scale = 1.0 / jnp.sqrt(jnp.float32(d))
  qb, kw, vw, mask = _prepare(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block)
  hkv, g = qb.shape[2], qb.shape[3]
  carry = blockwise._init_carry(qb.shape[0], hkv, g, block, d)
  out, lse = blockwise._finish(*blockwise._online_step(carry, qb, kw, vw, mask, scale))
  out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, -1, h, d)[:, :s]  # from [B·n,Hkv,G,bq,D]
  lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, -1, hkv, g)[:, :s]
  return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def segment_attention(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block):
  """q [B,S,H,D], k/v [B,S,Hkv,D] (query head h uses KV head h // (H/Hkv)); int32 q_seg/q_idx/
  kv_seg/kv_idx [B,S]. Returns [B,S,H,D]; a query that sees nothing gets zeros. Equals the reference
  only where `band_is_exact` holds (keys outside the band are ignored)."""
  return _forward(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block)[0]


def _fwd(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block):
  out, lse = _forward(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block)
  return out, (q, k, v, q_seg, q_idx, kv_seg, kv_idx, out, lse)


def _bwd(block, res, dout):
  q, k, v, q_seg, q_idx, kv_seg, kv_idx, out, lse = res
  b, s, h, d = q.shape
  hkv = k.shape[2]
  scale = 1.0 / jnp.sqrt(jnp.float32(d))
  n = -(-s // block)
  qb, kw, vw, mask = _prepare(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block)
  g = qb.shape[3]
  pad = lambda x, value=0: blockwise._pad_to(x, n * block, 1, value)
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B,S,H]
  dob = pad(dout).reshape(b * n, block, hkv, g, d)
  delta_b = pad(delta).reshape(b * n, block, hkv, g)
  lse_b = pad(lse, -blockwise._BIG).reshape(b * n, block, hkv, g)
  p, ds = blockwise._tile_grads(qb, kw, vw, dob, lse_b, delta_b, mask, scale)
  dq = blockwise._dq(ds, kw, scale).reshape(b, n * block, h, d)[:, :s]
  dk_w, dv_w = blockwise._dkv(p, ds, qb, dob, scale)
  # the windows overlap: each key's gradient sums its places in up to three windows (the
  # transpose of the gather that built them)
  unwindow = jax.linear_transpose(lambda x: _windows(x, n, _offsets(n)),
                                  jax.ShapeDtypeStruct((b, n * block, hkv, d), jnp.float32))
  (dk,), (dv,) = unwindow(dk_w), unwindow(dv_w)
  return (dq.astype(q.dtype), dk[:, :s].astype(k.dtype), dv[:, :s].astype(v.dtype),
          None, None, None, None)


segment_attention.defvjp(_fwd, _bwd)


def band_or_blockwise(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block_q, block_kv, *,
                      gated: bool = True):
  """The reference's result: the band over `block_kv`-token blocks when this batch is exact for it
  (one `lax.cond` per call), else blockwise. Blockwise alone, statically, when the lengths differ
  or (gated) the window scores exceed `BAND_BUDGET_BYTES`."""
  fallback = lambda: blockwise.segment_attention(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block_q,
                                                 block_kv)
  if q.shape[1] != k.shape[1] or (gated and window_bytes(q.shape, block_kv) > BAND_BUDGET_BYTES):
    return fallback()
  return lax.cond(band_is_exact(q_seg, q_idx, kv_seg, kv_idx, block_kv),
                  lambda: segment_attention(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block_kv),
                  fallback)
