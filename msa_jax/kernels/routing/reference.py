"""One shard's document top-k in plain jnp: the truth the Pallas kernels are tested against, and
their fallback.

The math is `msa_jax.model.router`'s (the same head, query and chunk reductions and score modes) on
keys in their stored dtype (`msa_jax.model.router_keys`): the keys are dequantised to float32 and
the query operand rounded as a bf16 matmul would see it, so the kernels differ from this only in
the order of float32 sums. It materialises the [B, T, C] token scores (C/Ct tiles of them under
XLA's fusion at best) and a float32 copy of low-precision keys; the kernels never do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from msa_jax.config import MSAConfig
from msa_jax.model import router, router_keys


def top_k_documents(q, route_mask, keys, key_scale, chunk_doc, num_docs: int, cfg: MSAConfig,
                    k: int):
  """q [B,T,H,D] prepared router queries (`router.prepare_queries`), route_mask [B,T] bool,
  keys [C,Hkv,D] prepared keys (`router_keys.prepare`: float32, bfloat16, or int8 with key_scale
  [C,Hkv]; else key_scale None), chunk_doc [C] int32 (the 1-based document column of each chunk,
  0 = empty) -> each row's best k' = min(k, num_docs) documents, best first, ties to the lower
  column: (scores [B,k'] f32, columns [B,k'] int32, found [B,k'] bool, False where the shard holds
  fewer documents)."""
  k_f32 = router_keys.dequantize(keys, key_scale)
  operand = router_keys.query_dtype(keys.dtype)
  scores = jax.vmap(lambda qb, mb: router.prepared_chunk_scores(
      qb[None], mb[None], k_f32[None], cfg, query_dtype=operand)[0])(q, route_mask)
  doc, present = router.document_scores(scores, jnp.broadcast_to(chunk_doc, scores.shape), num_docs,
                                        cfg.chunk_reduce)
  top, col = lax.top_k(doc, min(k, num_docs))  # absent columns are -inf and sit after real ones
  return top, col, jnp.take_along_axis(present, col, axis=-1)
