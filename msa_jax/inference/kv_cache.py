"""The decode cache: per layer, a preallocated buffer of every key the prompt stream may attend.

A prefill (stage 2) attends, per layer, over [gathered memory chunks | prompt] (router layers) or
[prompt] (the others); `MSADecoderLayer` hands those keys out with their segment ids and indices
(`PrefillOutput.kv`). `from_prefill` appends `budget` empty slots to each, and decoding writes new tokens
there with `lax.dynamic_update_slice` at a write index: no per-step concatenation, one compiled
program for every step of a bucket. The memory chunks stay as the prefill selected them (the
official stage 3 does not route again, MSA_REFERENCE_IMPL.md §3.3).

Masking follows `segment_attention`'s rule (kv_seg equal to the query's, kv_idx <= q_idx): slot j of
the decode region has idx S + j (S = the prefill's prompt length), so tokens appended together
attend causally among themselves, and unwritten slots (seg 0) are invisible.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax


@flax.struct.dataclass
class LayerCache:
  """k, v [B, L, Hkv, D]; seg, idx [B, L] int32; `end` (scalar int32): the next free slot."""

  k: jax.Array
  v: jax.Array
  seg: jax.Array
  idx: jax.Array
  end: jax.Array

  @property
  def capacity(self) -> int:
    return self.k.shape[1]

  def append(self, k, v, seg):
    """Writes n new tokens' k, v [B, n, Hkv, D] and seg [B, n] (0 = a row's padding) at `end`.
    Returns (the updated cache, the new tokens' idx [B, n]). The caller keeps `end + n` within
    capacity (`dynamic_update_slice` would clamp, overwriting the last slots)."""
    n = k.shape[1]
    write = lambda buf, x: lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), self.end, 1)
    q_idx = lax.dynamic_slice_in_dim(self.idx, self.end, n, axis=1)
    return self.replace(k=write(self.k, k), v=write(self.v, v), seg=write(self.seg, seg),
                        end=self.end + n), q_idx


def from_prefill(kv, prompt_len: int, budget: int) -> LayerCache:
  """A layer's prefill keys `kv = (k, v, seg, idx)` (the prompt last, `prompt_len` tokens) with
  `budget` empty decode slots after them."""
  k, v, seg, idx = kv
  b = k.shape[0]
  pad = lambda x: jnp.concatenate([x, jnp.zeros((b, budget) + x.shape[2:], x.dtype)], axis=1)
  decode_idx = jnp.broadcast_to(prompt_len + jnp.arange(budget, dtype=idx.dtype), (b, budget))
  return LayerCache(k=pad(k), v=pad(v), seg=pad(seg.astype(jnp.int32)),
                    idx=jnp.concatenate([idx.astype(jnp.int32), decode_idx.astype(jnp.int32)], 1),
                    end=jnp.int32(k.shape[1]))


def free_slots(caches) -> jax.Array:
  """Slots left for new tokens (equal in every layer: each layer's decode region is the same)."""
  return caches[0].capacity - caches[0].end
