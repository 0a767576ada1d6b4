"""Routing (pooling, scores, reductions, top-k) against a per-head numpy oracle."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import config as cfglib
from msa_jax.model import router
from msa_jax.model.pooling import chunk_mean
from tests.msa_fixtures import make_batch, random_samples


def _oracle(q_r, route, k_tok, segment_ids, cfg, num_cols):
  """Per row, per head loops: ragged chunks of P tokens per document, mean-pooled router keys,
  per-head scores, head -> query -> chunk -> document reductions. Returns [B, num_cols] scores
  (-inf absent) and the chunk lists."""
  b_sz, _, h, d = q_r.shape
  g = h // k_tok.shape[2]
  p = cfg.chunk_size
  out = np.full((b_sz, num_cols), -np.inf)
  for b in range(b_sz):
    seg = segment_ids[b]
    for doc in range(1, seg.max() + 1):
      toks = np.flatnonzero(seg == doc)
      chunk_scores = []
      for start in range(0, len(toks), p):
        kbar = k_tok[b, toks[start:start + p]].astype(np.float64).mean(0)  # [Hkv, D]
        per_query = []
        for t in np.flatnonzero(route[b]):
          per_head = []
          for head in range(h):
            qv, kv = q_r[b, t, head].astype(np.float64), kbar[head // g]
            if cfg.score_mode == "cosine":
              per_head.append(qv @ kv / np.linalg.norm(qv) / np.linalg.norm(kv))
            else:
              per_head.append(qv @ kv / np.sqrt(d))
          per_query.append(np.mean(per_head) if cfg.head_reduce == "mean" else np.max(per_head))
        if cfg.query_reduce == "max":
          chunk_scores.append(max(per_query))
        elif cfg.query_reduce == "mean":
          chunk_scores.append(np.mean(per_query))
        else:
          chunk_scores.append(per_query[-1])
      out[b, doc - 1] = max(chunk_scores) if cfg.chunk_reduce == "max" else np.mean(chunk_scores)
  return out


COMBOS = list(itertools.product(("mean", "max"), ("max", "mean", "last"), ("max", "mean"),
                                ("cosine", "scaled_dot")))


@pytest.mark.parametrize("head,query,chunk,mode", COMBOS)
def test_routing_matches_per_head_oracle(head, query, chunk, mode):
  rng = np.random.default_rng(hash((head, query, chunk, mode)) % 2**32)
  _, msa = cfglib.preset("tiny")  # P = 4, k = 2
  cfg = msa.replace(head_reduce=head, query_reduce=query, chunk_reduce=chunk, score_mode=mode)
  # ragged last chunks (5, 9, 3, 7, 2, 1 are not multiples of P=4) and exact ones (4, 8)
  samples = random_samples(rng, [[5, 9, 3, 7, 2], [4, 8, 1]])
  memory, prompt = make_batch(samples, cfg)
  b, s_mem = memory.tokens.shape
  s_q = prompt.tokens.shape[1]
  k_tok = rng.standard_normal((b, s_mem, 2, 16)).astype(np.float32)
  q_r = rng.standard_normal((b, s_q, 4, 16)).astype(np.float32)
  k_pool = chunk_mean(jnp.asarray(k_tok), memory.chunk_ids, memory.chunk_len)
  args = (jnp.asarray(q_r), prompt.route_mask, k_pool, memory.chunk_doc, cfg)
  doc, sel = router.score_documents(*args), router.route(*args)
  cols = memory.chunk_doc.shape[-1]
  want = _oracle(q_r, np.asarray(prompt.route_mask), k_tok, np.asarray(memory.segment_ids), cfg,
                 cols)
  got = np.asarray(doc.scores)
  present = np.isfinite(want)
  np.testing.assert_array_equal(np.asarray(doc.present), present)
  np.testing.assert_allclose(got[present], want[present], rtol=1e-5, atol=1e-5)
  assert np.all(np.isneginf(got[~present]))
  for row in range(b):  # hard top-k with k_eff = min(k, documents present)
    n_docs = int(present[row].sum())
    top = set(np.argsort(-np.where(present[row], want[row], -np.inf))[:min(cfg.top_k_docs, n_docs)])
    assert set(np.flatnonzero(np.asarray(sel.mask(cols))[row])) == top


def test_top_k_with_fewer_documents_than_k():
  scores = jnp.array([[0.3, -jnp.inf, -jnp.inf, -jnp.inf], [0.1, 0.5, 0.2, -jnp.inf]])
  present = jnp.isfinite(scores)
  doc = router.DocumentScores(scores, present)
  chosen = np.asarray(router.select_top_k(doc, 3).mask(4))
  np.testing.assert_array_equal(chosen, [[1, 0, 0, 0], [1, 1, 1, 0]])
  top = router.select_top_k(doc, 2)
  np.testing.assert_array_equal(np.asarray(top.mask(4)), [[1, 0, 0, 0], [0, 1, 1, 0]])
  # best first, -1 / -inf / invalid past the documents present
  np.testing.assert_array_equal(np.asarray(top.doc_index), [[0, -1], [1, 2]])
  np.testing.assert_array_equal(np.asarray(top.valid), [[True, False], [True, True]])
  assert np.isneginf(np.asarray(top.scores)[0, 1])


def test_chunk_mean_is_float32_over_true_lengths():
  x = jnp.arange(12, dtype=jnp.bfloat16).reshape(1, 6, 2)
  ids = jnp.array([[0, 0, 0, 1, 1, 3]])  # id 3 = C: a padding token, dropped
  lens = jnp.array([[3, 2, 0]])
  got = chunk_mean(x, ids, lens)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got[0], [[2, 3], [7, 8], [0, 0]])
