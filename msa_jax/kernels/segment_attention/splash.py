"""Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`, Mosaic TPU) with segment
ids and a causal mask, for the masks it can express:

  * memory stream, several documents a row: yes, directly. Splash's segment ids are our document
    ids and its causal mask is by row position, which is our idx rule while idx increases along
    the row (padding, segment 0, sees only padding; those outputs are zeroed).
  * prompt stream over [selected chunks | prompt]: yes, through `layout.causal_layout` (the same
    permutation cuDNN uses); segment ids then mark the live prefix.
  * decode (a few queries against a cache): no, the blockwise fallback.
Splash's mask is static and fixed by position; whether a batch's (seg, idx) fit it is data, tested
on device (`lax.cond` to blockwise). Shapes: head_dim and the sequence a multiple of 128 (one
lane-wide tile). On CPU the kernel runs in Pallas's TPU interpret mode (the tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from msa_jax.kernels.segment_attention import banded, layout as layout_lib

_LANES = 128


def unsupported(q_shape, kv_shape, *, backend: str, interpret: bool) -> str | None:
  """Why splash cannot take these static shapes (None: it can, subject to the on-device test)."""
  if backend != "tpu" and not interpret:
    return f"splash needs a TPU, the backend is {backend}"
  if q_shape[-1] % _LANES:
    return f"splash needs head_dim a multiple of {_LANES}, got {q_shape[-1]}"
  if kv_shape[1] < q_shape[1]:
    return "fewer keys than queries"
  if kv_shape[1] % _LANES:
    return f"splash needs the key length a multiple of {_LANES}, got {kv_shape[1]}"
  return None


@functools.lru_cache(maxsize=None)
def _kernel(length: int, heads: int, interpret: bool):
  block = next(b for b in (512, 256, _LANES) if length % b == 0)
  sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                        block_kv_dq=block)
  mask = sa.MultiHeadMask([sa.CausalMask((length, length)) for _ in range(heads)])
  with jax.ensure_compile_time_eval():  # cached: its mask tables must be constants, not tracers
    return sa.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                              interpret=interpret)


def causal_segment_attention(q, k, v, seg, *, interpret: bool):
  """Splash over rows of equal length: q [B,L,H,D], k/v [B,L,Hkv,D], seg [B,L] (queries and keys
  share it). Returns [B,L,H,D]; a query sees keys at or before it with its segment."""
  kernel = _kernel(q.shape[1], q.shape[2], interpret)
  scale = jnp.asarray(1.0 / (q.shape[-1] ** 0.5), q.dtype)  # splash does not scale the scores
  heads_first = lambda x: jnp.swapaxes(x, 0, 1)
  one = lambda q, k, v, s: heads_first(kernel(heads_first(q) * scale, heads_first(k),
                                              heads_first(v), segment_ids=sa.SegmentIds(s, s)))
  return jax.vmap(one)(q, k, v, seg)


def _direct(q, k, v, seg, interpret):
  out = causal_segment_attention(q, k, v, seg, interpret=interpret)
  return jnp.where((seg != 0)[:, :, None, None], out, jnp.zeros_like(out))


def _through_layout(q, k, v, lay, interpret):
  qp, kp, vp = layout_lib.to_layout(lay, q, k, v)
  live = (jnp.arange(kp.shape[1])[None, :] < lay.length[:, None]).astype(jnp.int32)
  return layout_lib.from_layout(lay, causal_segment_attention(qp, kp, vp, live,
                                                              interpret=interpret))


def segment_attention(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block_q, block_kv, *,
                      interpret: bool = False):
  """The reference's result: splash when this batch's mask fits it, else blockwise (or the band,
  `banded.band_or_blockwise`)."""
  fallback = lambda: banded.band_or_blockwise(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block_q,
                                              block_kv)
  if q.shape[1] == k.shape[1]:  # self attention: documents as splash segments
    ok = (jnp.all(q_seg == kv_seg) & jnp.all(q_idx == kv_idx)
          & jnp.all(layout_lib.increasing_where_live(q_seg, q_idx)))
    return lax.cond(ok, lambda: _direct(q, k, v, q_seg, interpret), fallback)
  lay = layout_lib.causal_layout(q_seg, q_idx, kv_seg, kv_idx)
  return lax.cond(lay.ok, lambda: _through_layout(q, k, v, lay, interpret), fallback)
