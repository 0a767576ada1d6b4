"""MSA routing: score router queries against pooled router keys, reduce to document scores, pick the
top-k documents (MSA_PAPER.md §1.2 Eq. 2, MSA_REFERENCE_IMPL.md §2.5).

score(t, c) = reduce_h <q_r[t,h], k̄_r[c, h // G]>   (cosine: both L2-normalised; else scaled by 1/√D)
chunk score = reduce over route tokens t;  document score = reduce over the document's chunks;
selection = hard top-k over present documents, k_eff = min(k, documents present), no gradient.

The head mean is linear, so query heads are summed per KV group first and scored with one matmul
[T, Hkv·D] x [Hkv·D, C]: no [B, H, T, C] tensor exists. Everything is float32.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from msa_jax.config import MSAConfig

EPS = 1e-12


@flax.struct.dataclass
class Selection:
  """One router layer's choice per row, best first; every memory view returns this type.

  doc_index [B, k] int32: 0-based document indices in the view's numbering (the in-batch view's
  document columns, the bank's global indices), -1 where fewer than k documents exist;
  scores [B, k] f32 (-inf there); valid [B, k] bool.
  """

  doc_index: jax.Array
  scores: jax.Array
  valid: jax.Array

  def mask(self, num_docs: int) -> jax.Array:
    """The selection as a [B, num_docs] bool mask over document indices."""
    rows = jnp.arange(self.doc_index.shape[0])[:, None]
    empty = jnp.zeros((self.doc_index.shape[0], num_docs), bool)
    return empty.at[rows, jnp.maximum(self.doc_index, 0)].max(self.valid)


@flax.struct.dataclass
class DocumentScores:
  """Every document's score over columns 0..D-1 (column d-1 = document d): scores [B, D] f32
  (-inf for absent documents), present [B, D] bool. Training keeps them for the aux loss."""

  scores: jax.Array
  present: jax.Array


def l2_normalize(x):
  x = x.astype(jnp.float32)
  return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), EPS))


def _as_operand(x, query_dtype):
  """x rounded to the dtype it enters the score matmul in, computed on in float32."""
  return x.astype(query_dtype).astype(jnp.float32)


def _token_chunk_scores(q, k, head_reduce: str, query_dtype=jnp.float32):
  """q [B,T,H,D], k [B,C,Hkv,D] (f32) -> [B,T,C] reduced over heads. The matmul's query operand
  (the group sum for the head mean, each head for the max) is rounded to `query_dtype`."""
  b, t, h, d = q.shape
  c, hkv = k.shape[1], k.shape[2]
  qg = q.reshape(b, t, hkv, h // hkv, d)
  if head_reduce == "mean":
    summed = _as_operand(jnp.sum(qg, axis=3), query_dtype).reshape(b, t, hkv * d)
    return jnp.einsum("btx,bcx->btc", summed, k.reshape(b, c, hkv * d)) / h

  qg = _as_operand(qg, query_dtype)

  def per_kv_head(best, j):  # head max: one KV group at a time, [B,T,G,C] at most
    s = jnp.einsum("btgd,bcd->btgc", qg[:, :, j], k[:, :, j])
    return jnp.maximum(best, jnp.max(s, axis=2)), None

  best, _ = lax.scan(per_kv_head, jnp.full((b, t, c), -jnp.inf, jnp.float32), jnp.arange(hkv))
  return best


def _reduce_queries(s, route_mask, query_reduce: str):
  """s [B,T,C] -> [B,C] over the route tokens of each row."""
  if query_reduce == "max":
    return jnp.max(jnp.where(route_mask[:, :, None], s, -jnp.inf), axis=1)
  if query_reduce == "mean":
    count = jnp.maximum(jnp.sum(route_mask, axis=1), 1)[:, None]
    return jnp.sum(jnp.where(route_mask[:, :, None], s, 0.0), axis=1) / count
  last = jnp.max(jnp.where(route_mask, jnp.arange(s.shape[1]), -1), axis=1)  # "last"
  picked = jnp.take_along_axis(s, jnp.maximum(last, 0)[:, None, None], axis=1)[:, 0]
  return jnp.where((last >= 0)[:, None], picked, -jnp.inf)


def prepare_queries(q_r, cfg: MSAConfig, *, coupled_scale: bool = False):
  """Router queries as the scores use them: float32, L2-normalised (cosine), scaled by 1/√D
  (scaled_dot or coupled)."""
  q = q_r.astype(jnp.float32)
  if cfg.score_mode == "cosine":
    q = l2_normalize(q)
  if cfg.score_mode == "scaled_dot" or coupled_scale:
    q = q * (1.0 / jnp.sqrt(jnp.float32(q.shape[-1])))
  return q


def prepare_keys(k_r, cfg: MSAConfig):
  """Pooled router keys as the scores use them: float32, L2-normalised (cosine). A memory bank
  prepares its keys once instead of on every routing call."""
  k = k_r.astype(jnp.float32)
  return l2_normalize(k) if cfg.score_mode == "cosine" else k


def prepared_chunk_scores(q, route_mask, k, cfg: MSAConfig, *, query_dtype=jnp.float32):
  """Chunk scores [B,C] from prepared queries q [B,T,H,D] and prepared keys k [B,C,Hkv,D] (f32);
  `query_dtype`: see `router_keys.query_dtype`."""
  return _reduce_queries(_token_chunk_scores(q, k, cfg.head_reduce, query_dtype), route_mask,
                         cfg.query_reduce)


def chunk_scores(q_r, route_mask, k_r, cfg: MSAConfig, *, coupled_scale: bool = False):
  """Router queries q_r [B,T,H,D] (raw projections), route_mask [B,T], pooled router keys
  k_r [B,C,Hkv,D] (raw means) -> chunk scores [B,C] f32 (empty slots are not masked here)."""
  return prepared_chunk_scores(prepare_queries(q_r, cfg, coupled_scale=coupled_scale), route_mask,
                               prepare_keys(k_r, cfg), cfg)


def document_scores(scores, chunk_doc, num_docs: int, chunk_reduce: str):
  """Chunk scores [B,C] and chunk_doc [B,C] (1-based, 0 = empty) -> ([B,D] scores, [B,D] present)."""
  ids = jnp.where(chunk_doc > 0, chunk_doc - 1, num_docs)  # empty slots go out of range: dropped
  count = jax.vmap(lambda i: jax.ops.segment_sum(jnp.ones_like(i), i, num_segments=num_docs))(ids)
  present = count > 0
  if chunk_reduce == "max":
    doc = jax.vmap(lambda s, i: jax.ops.segment_max(s, i, num_segments=num_docs))(scores, ids)
  else:
    doc = jax.vmap(lambda s, i: jax.ops.segment_sum(s, i, num_segments=num_docs))(scores, ids)
    doc = doc / jnp.maximum(count, 1)
  return jnp.where(present, doc, -jnp.inf), present


def select_top_k(doc: DocumentScores, k: int) -> Selection:
  """The top-min(k, present) documents best first (ties: the lower index); no gradient flows
  through the selection, nor through its scores (the router learns from the aux loss)."""
  scores = lax.stop_gradient(jnp.where(doc.present, doc.scores, -jnp.inf))
  top, idx = lax.top_k(scores, min(k, scores.shape[-1]))
  valid = jnp.take_along_axis(doc.present, idx, axis=-1)
  return Selection(jnp.where(valid, idx, -1).astype(jnp.int32), jnp.where(valid, top, -jnp.inf),
                   valid)


def score_documents(q_r, route_mask, k_r, chunk_doc, cfg: MSAConfig, *,
                    coupled_scale: bool = False) -> DocumentScores:
  """Document scores of one layer over the chunk slots of each row."""
  s = chunk_scores(q_r, route_mask, k_r, cfg, coupled_scale=coupled_scale)
  return DocumentScores(*document_scores(s, chunk_doc, chunk_doc.shape[-1], cfg.chunk_reduce))


def route(q_r, route_mask, k_r, chunk_doc, cfg: MSAConfig, *, coupled_scale: bool = False
          ) -> Selection:
  """Full routing of one layer over the chunk slots of each row."""
  return select_top_k(score_documents(q_r, route_mask, k_r, chunk_doc, cfg,
                                      coupled_scale=coupled_scale), cfg.top_k_docs)
