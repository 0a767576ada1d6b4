"""Memory-parallel routing (msa_jax/memory/routing.py) equals single-device `router.route` over all
chunks on 8 simulated devices: documents of very different lengths, shards with fewer documents than k
(or none), ties, several score modes and reductions, the batch replicated or sharded; through the
reference (auto, on CPU) and through both fused kernels in interpret mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import config as cfglib
from msa_jax.memory import routing
from msa_jax.model import router
from msa_jax.sharding import make_mesh
from tests.bank_fixtures import random_keys

HKV, D, H = 2, 8, 4
# chunk counts per document: one long document, many one-chunk ones
COUNTS = [1, 13, 2, 3, 1, 6, 1, 1, 4, 2, 1, 3]


def _bank(rng, counts, *, ties=()):
  return random_keys(rng, counts, HKV, D, ties=ties)


def _single_device(q_r, mask, keys, offsets, cfg, coupled):
  """`router.route` over every chunk of the bank, each request seeing all of it: the truth."""
  b = q_r.shape[0]
  chunk_doc = np.repeat(np.arange(1, offsets.size), np.diff(offsets)).astype(np.int32)
  args = (jnp.asarray(q_r), jnp.asarray(mask), jnp.broadcast_to(keys, (b,) + keys.shape),
          jnp.broadcast_to(chunk_doc, (b, chunk_doc.size)), cfg)
  doc = router.score_documents(*args, coupled_scale=coupled)
  sel = router.route(*args, coupled_scale=coupled)
  n = offsets.size - 1  # router.route has a column per chunk slot; documents are the first n
  assert not np.asarray(doc.present)[:, n:].any()
  return np.asarray(doc.scores)[:, :n], np.asarray(sel.mask(chunk_doc.size))[:, :n]


def _sharded(q_r, mask, keys, offsets, cfg, coupled, mesh, batch_axis, implementation="auto"):
  plan = routing.plan_shards(offsets, mesh.shape["memory"], slot_multiple=4)
  rows = plan.chunk_rows.reshape(-1)
  placed = np.where((rows >= 0)[:, None, None], keys[np.maximum(rows, 0)], 0.0)
  shard = lambda x: jax.device_put(x, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("memory")))
  prepared = router.prepare_keys(shard(placed), cfg)
  fn = jax.jit(lambda q, m, k, c, i: routing.route_sharded(
      q, m, k, c, i, cfg, mesh=mesh, num_docs=plan.num_docs, batch_axis=batch_axis,
      coupled_scale=coupled, implementation=implementation))
  out = fn(q_r, mask, prepared, shard(plan.chunk_doc.reshape(-1)),
           shard(plan.doc_index.reshape(-1)))
  return plan, [np.asarray(x) for x in out]


def _check(scores, index, valid, ref_scores, ref_selected, k):
  n = ref_scores.shape[1]
  for b in range(scores.shape[0]):
    k_eff = min(k, n)
    assert valid[b].sum() == k_eff and valid[b, :k_eff].all()
    assert np.all(index[b, k_eff:] == -1) and np.all(np.isneginf(scores[b, k_eff:]))
    # best first, ties to the lower document index: the order of a stable sort on -score
    expected = np.argsort(-ref_scores[b], kind="stable")[:k_eff]
    np.testing.assert_array_equal(index[b, :k_eff], expected)
    assert set(index[b, :k_eff]) == set(np.flatnonzero(ref_selected[b]))
    np.testing.assert_allclose(scores[b, :k_eff], ref_scores[b, expected], rtol=1e-6, atol=1e-6)


def test_plan_shards_keeps_documents_whole_and_balances_chunks():
  offsets = np.concatenate([[0], np.cumsum(COUNTS)])
  plan = routing.plan_shards(offsets, 4, slot_multiple=4)
  assert plan.slots_per_shard % 4 == 0 and plan.max_doc_chunks == 13
  loads = np.bincount(plan.doc_shard, weights=COUNTS, minlength=4)
  assert loads.max() - loads.min() <= max(COUNTS)  # greedy: never worse than one document apart
  seen = []
  for s in range(4):
    docs = plan.doc_index[s][plan.doc_index[s] < plan.num_docs]
    assert np.all(np.diff(docs) > 0)  # ascending global order within a shard
    for col, d in enumerate(docs):
      start = plan.doc_local_start[d]
      rows = plan.chunk_rows[s, start:start + COUNTS[d]]
      np.testing.assert_array_equal(rows, np.arange(offsets[d], offsets[d + 1]))
      assert np.all(plan.chunk_doc[s, start:start + COUNTS[d]] == col + 1)
      assert plan.doc_shard[d] == s
    seen.extend(docs)
  assert sorted(seen) == list(range(len(COUNTS)))
  live = plan.chunk_rows[plan.chunk_rows >= 0]
  np.testing.assert_array_equal(np.sort(live), np.arange(offsets[-1]))
  assert np.all(plan.chunk_doc[plan.chunk_rows < 0] == 0)
  with pytest.raises(routing.RoutingError, match="CSR"):
    routing.plan_shards([0, 2, 2, 5], 2)


COMBOS = [
    (dict(head_reduce="mean", query_reduce="max", chunk_reduce="max", score_mode="cosine"), False),
    (dict(head_reduce="max", query_reduce="mean", chunk_reduce="mean", score_mode="scaled_dot"),
     False),
    (dict(head_reduce="mean", query_reduce="last", chunk_reduce="max", score_mode="cosine"), True),
]


@pytest.mark.parametrize("overrides,coupled", COMBOS)
@pytest.mark.parametrize("batch_sharded", [False, True])
@pytest.mark.parametrize("implementation", ["auto", "pallas_gpu", "pallas_tpu"])
def test_sharded_routing_equals_single_device(overrides, coupled, batch_sharded, implementation):
  rng = np.random.default_rng(len(str(overrides)) + batch_sharded)
  cfg = cfglib.MSAConfig(top_k_docs=4, **overrides)
  # documents 7 and 10 copy document 4 (one chunk each), document 9 copies document 2: exact ties
  keys, offsets = _bank(rng, COUNTS, ties=[(4, 7), (4, 10), (2, 9)])
  b, t = 4, 5
  q_r = rng.standard_normal((b, t, H, D)).astype(np.float32)
  q_r[0, :, :, :] = np.repeat(keys[offsets[4]], H // HKV, axis=0)  # row 0 prefers the tied trio
  q_r[1, 2] = np.repeat(keys[offsets[2]], H // HKV, axis=0) * 3.0
  mask = rng.random((b, t)) < 0.6
  mask[:, 1] = True
  mask[3] = False  # no route token: every score ties (-inf or 0), the lowest indices win
  if batch_sharded:
    mesh = make_mesh((2, 4), ("data", "memory"))  # 4 shards of 12 documents
  else:
    mesh = make_mesh((8,), ("memory",))  # 8 shards: most hold one or two documents (< k)
  plan, (scores, index, valid) = _sharded(q_r, mask, keys, offsets, cfg, coupled, mesh,
                                          "data" if batch_sharded else None, implementation)
  assert (plan.doc_index < plan.num_docs).sum(1).min() < cfg.top_k_docs
  ref_scores, ref_selected = _single_device(q_r, mask, keys, offsets, cfg, coupled)
  _check(scores, index, valid, ref_scores, ref_selected, cfg.top_k_docs)
  assert set(index[0]) >= {4, 7, 10}  # the tie is resolved by document index


@pytest.mark.parametrize("implementation", ["auto", "pallas_gpu", "pallas_tpu"])
def test_fewer_documents_than_k_and_empty_shards(implementation):
  rng = np.random.default_rng(5)
  cfg = cfglib.MSAConfig(top_k_docs=4)
  keys, offsets = _bank(rng, [3, 1, 2])  # 3 documents on 8 shards: 5 shards hold nothing
  q_r = rng.standard_normal((2, 3, H, D)).astype(np.float32)
  mask = np.ones((2, 3), bool)
  plan, (scores, index, valid) = _sharded(q_r, mask, keys, offsets, cfg, False,
                                          make_mesh((8,), ("memory",)), None, implementation)
  assert (plan.doc_index < plan.num_docs).sum(1).tolist().count(0) == 5
  ref_scores, ref_selected = _single_device(q_r, mask, keys, offsets, cfg, False)
  _check(scores, index, valid, ref_scores, ref_selected, cfg.top_k_docs)
  assert valid.sum(1).tolist() == [3, 3]
