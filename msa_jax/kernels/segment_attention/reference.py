"""Dense segment attention: the truth the blockwise and Pallas implementations are tested against.

One masking rule serves every MSA attention: query i may attend key j iff
    kv_seg[j] != 0  and  q_seg[i] == kv_seg[j]  and  kv_idx[j] <= q_idx[i].
Memory-stream tokens use their document id as segment and their row index as idx (causal within a
document); prompt tokens use segment 1 (0 = padding) and their index; selected pooled chunks use
segment 1 and the index of the first memory-seeing prompt token, so the template head (earlier
indices) does not see them: the official packed layout puts the chunks right after the template head.
"""

from __future__ import annotations

import jax.numpy as jnp


def segment_mask(q_seg, q_idx, kv_seg, kv_idx):
  """[B, Sq, Skv] bool."""
  return ((kv_seg[:, None, :] != 0) & (q_seg[:, :, None] == kv_seg[:, None, :])
          & (kv_idx[:, None, :] <= q_idx[:, :, None]))


def segment_attention(q, k, v, q_seg, q_idx, kv_seg, kv_idx):
  """q [B,Sq,H,D], k/v [B,Skv,Hkv,D]; query head h uses KV head h // (H/Hkv) (HF repeat_kv).
  Scores and softmax in float32, materialised whole; a query that may see nothing gets zeros."""
  b, s, h, d = q.shape
  hkv = k.shape[2]
  mask = segment_mask(q_seg, q_idx, kv_seg, kv_idx)
  qg = q.reshape(b, s, hkv, h // hkv, d)
  scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, None, None], scores / jnp.sqrt(jnp.float32(d)), -jnp.inf)
  peak = jnp.max(scores, axis=-1, keepdims=True)
  probs = jnp.exp(scores - jnp.where(jnp.isfinite(peak), peak, 0.0))
  total = jnp.sum(probs, axis=-1, keepdims=True)
  probs = probs / jnp.where(total > 0, total, 1.0)
  out = jnp.einsum("bkgst,btkd->bskgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, s, h, d).astype(q.dtype)
