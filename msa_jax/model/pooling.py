"""Ragged chunk-mean pooling: each document is cut into chunks of P tokens (its last chunk shorter),
and K, V and router keys are averaged per chunk with float32 accumulation (MSA_PAPER.md §1.2, φ)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunk_mean(x, chunk_ids, chunk_len):
  """x [B, S, ...], chunk_ids [B, S] (slot per token; ids >= C are dropped), chunk_len [B, C]
  -> float32 [B, C, ...] means (zeros for empty slots)."""
  num_chunks = chunk_len.shape[-1]
  sums = jax.vmap(lambda xb, ib: jax.ops.segment_sum(xb.astype(jnp.float32), ib,
                                                     num_segments=num_chunks))(x, chunk_ids)
  count = jnp.maximum(chunk_len, 1).astype(jnp.float32)
  return sums / count.reshape(count.shape + (1,) * (sums.ndim - 2))
