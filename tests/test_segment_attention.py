"""Segment attention: the dense reference against a numpy oracle, the blockwise (flash-style)
implementation against the reference in values and gradients, including skipped tiles, and the
loop-free band for packed short documents: its values, gradients, residuals, exactness test and
the dispatch (one cond, blockwise when the band is not exact, a memory budget)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax.kernels.segment_attention import api, banded, blockwise, reference


def _inputs(rng, b=2, sq=37, skv=37, h=4, hkv=2, d=8):
  q = rng.standard_normal((b, sq, h, d)).astype(np.float32)
  k = rng.standard_normal((b, skv, hkv, d)).astype(np.float32)
  v = rng.standard_normal((b, skv, hkv, d)).astype(np.float32)
  return q, k, v


def _docs(b, s, bounds):
  """Segment ids from per-row document boundaries (list of (start, end, id)); the rest is 0."""
  seg = np.zeros((b, s), np.int32)
  for row, spans in enumerate(bounds):
    for start, end, doc in spans:
      seg[row, start:end] = doc
  return seg, np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy()


def test_reference_matches_numpy_oracle():
  rng = np.random.default_rng(0)
  q, k, v = _inputs(rng, sq=9, skv=9)
  seg, idx = _docs(2, 9, [[(0, 4, 1), (4, 8, 2)], [(0, 9, 1)]])
  got = np.asarray(reference.segment_attention(q, k, v, seg, idx, seg, idx))
  want = np.zeros_like(q)
  for b in range(2):
    for i in range(9):
      keys = [j for j in range(9) if seg[b, j] and seg[b, j] == seg[b, i] and j <= i]
      for h in range(4):
        s = np.array([q[b, i, h] @ k[b, j, h // 2] for j in keys]) / np.sqrt(8)
        p = np.exp(s - s.max()) / np.exp(s - s.max()).sum() if keys else s
        want[b, i, h] = sum(pj * v[b, j, h // 2] for pj, j in zip(p, keys)) if keys else 0
  np.testing.assert_allclose(got, want, atol=1e-5)


CASES = {
    # memory stream: documents in a row, padding at the end
    "documents": (37, 37, [[(0, 10, 1), (10, 30, 2)], [(0, 5, 1), (5, 36, 3)]], 8, 8),
    # long rows of short documents: most tiles are skipped
    "many_short_docs": (64, 64, [[(i * 8, i * 8 + 8, i + 1) for i in range(8)],
                                 [(i * 4, i * 4 + 4, i + 1) for i in range(15)]], 8, 8),
    "uneven_blocks": (37, 37, [[(0, 37, 1)], [(3, 20, 1), (20, 30, 2)]], 16, 4),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_blockwise_matches_reference_values_and_gradients(name):
  s, _, bounds, bq, bk = CASES[name]
  rng = np.random.default_rng(1)
  q, k, v = _inputs(rng, sq=s, skv=s)
  seg, idx = _docs(2, s, bounds)
  args = (seg, idx, seg, idx)
  ct = rng.standard_normal(q.shape).astype(np.float32)
  f_block = lambda q, k, v: blockwise.segment_attention(q, k, v, *args, bq, bk)
  f_ref = lambda q, k, v: reference.segment_attention(q, k, v, *args)
  np.testing.assert_allclose(jax.jit(f_block)(q, k, v), f_ref(q, k, v), atol=2e-6)
  g_block = jax.jit(jax.grad(lambda *x: jnp.sum(f_block(*x) * ct), argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.grad(lambda *x: jnp.sum(f_ref(*x) * ct), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_block, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_prompt_over_selected_chunks_then_prompt():
  """The router-layer pattern: KV = [chunks (segment 1 if selected, idx = first memory-seeing
  token) ; prompt (segment 1, causal)]; the template head (idx < 3) sees no chunk."""
  rng = np.random.default_rng(2)
  n_chunks, sq = 12, 10
  q, _, _ = _inputs(rng, sq=sq, skv=sq)
  _, k, v = _inputs(rng, sq=sq, skv=n_chunks + sq)
  selected = (rng.random((2, n_chunks)) < 0.5).astype(np.int32)
  q_seg = np.ones((2, sq), np.int32)
  q_seg[1, 7:] = 0  # padding
  q_idx = np.broadcast_to(np.arange(sq, dtype=np.int32), (2, sq)).copy()
  kv_seg = np.concatenate([selected, q_seg], axis=1)
  kv_idx = np.concatenate([np.full((2, n_chunks), 3, np.int32), q_idx], axis=1)
  mask = reference.segment_mask(q_seg, q_idx, kv_seg, kv_idx)
  assert not mask[:, :3, :n_chunks].any() and mask[0, 3, :n_chunks].sum() == selected[0].sum()
  got = api.segment_attention(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block_q=4, block_kv=8)
  want = api.segment_attention(q, k, v, q_seg, q_idx, kv_seg, kv_idx, implementation="reference")
  np.testing.assert_allclose(got, want, atol=2e-6)
  assert not np.asarray(got)[1, 7:].any()  # padding queries see nothing: zeros, never NaN


def test_tiles_no_query_can_see_are_skipped():
  s = 64
  seg, idx = _docs(1, s, [[(i * 8, i * 8 + 8, i + 1) for i in range(8)]])
  needed = np.asarray(blockwise._needed_tiles(jnp.asarray(seg), jnp.asarray(idx), jnp.asarray(seg),
                                              jnp.asarray(idx), 8, 8))
  np.testing.assert_array_equal(needed, np.eye(8, dtype=bool))  # one document per tile


def test_needed_tiles_are_those_some_row_needs():
  """Rows whose document boundaries fall in different places: a tile is needed exactly when some
  row has a visible (query, key) pair in it (numpy oracle from the dense mask), not whenever the
  rows' segment ranges, merged over the batch, overlap."""
  s, block = 64, 8
  rng = np.random.default_rng(3)
  bounds = []
  for _ in range(3):
    cuts = np.sort(rng.choice(np.arange(1, s), size=9, replace=False))
    edges = [0, *cuts.tolist(), s]
    bounds.append([(a, b, i + 1) for i, (a, b) in enumerate(zip(edges, edges[1:]))])
  seg, idx = _docs(3, s, bounds)
  mask = np.asarray(reference.segment_mask(seg, idx, seg, idx))  # [B, Sq, Skv]
  n = s // block
  want = mask.reshape(3, n, block, n, block).any(axis=(0, 2, 4))
  needed = np.asarray(blockwise._needed_tiles(*map(jnp.asarray, (seg, idx, seg, idx)), block,
                                              block))
  np.testing.assert_array_equal(needed, want)
  q, k, v = _inputs(rng, b=3, sq=s, skv=s)
  np.testing.assert_allclose(blockwise.segment_attention(q, k, v, seg, idx, seg, idx, block, block),
                             reference.segment_attention(q, k, v, seg, idx, seg, idx), atol=2e-6)


def test_unknown_implementation_is_named():
  with pytest.raises(ValueError, match="unknown segment attention implementation 'pallas'"):
    api.segment_attention(*([None] * 7), implementation="pallas")


# Band tests: 8-token blocks over 37-token rows (5 blocks, the last padded). Documents of up to
# block + 1 = 9 tokens, cut in different places in each row, padding at the row ends; row 2's third
# document has one idx for all its tokens (they see each other both ways), so its first block's
# queries see keys of the next block: the window's i+1 part is used.
BAND_BLOCK, BAND_LEN = 8, 37
BAND_ROWS = [[(0, 9, 1), (9, 18, 2), (18, 27, 3), (27, 36, 4)],
             [(0, 3, 1), (3, 12, 2), (12, 21, 3), (21, 30, 4), (30, 33, 5)],
             [(0, 5, 1), (5, 14, 2), (14, 22, 3), (22, 31, 4), (31, 34, 5)]]


def _band_case(rows=BAND_ROWS):
  seg, idx = _docs(len(rows), BAND_LEN, rows)
  if rows is BAND_ROWS:
    idx[2, 14:22] = 21
  return seg, idx


def _values_and_grads(f, q, k, v, ct):
  out = jax.jit(f)(q, k, v)
  grads = jax.jit(jax.grad(lambda *x: jnp.sum(f(*x) * ct), argnums=(0, 1, 2)))(q, k, v)
  return out, grads


def _assert_is_reference(f, q, k, v, args):
  ct = np.random.default_rng(7).standard_normal(q.shape).astype(np.float32)
  out, grads = _values_and_grads(f, q, k, v, ct)
  want_out, want_grads = _values_and_grads(
      lambda q, k, v: reference.segment_attention(q, k, v, *args), q, k, v, ct)
  np.testing.assert_allclose(out, want_out, atol=2e-6)
  for a, b in zip(grads, want_grads):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_band_case_uses_every_part_of_the_window():
  """The case is not trivial: visible pairs lie in tiles (i, i-1), (i, i) and (i, i+1), and
  nowhere else; padding queries see nothing."""
  seg, idx = _band_case()
  mask = np.asarray(reference.segment_mask(seg, idx, seg, idx))
  n = -(-BAND_LEN // BAND_BLOCK)
  padded = np.zeros((3, n * BAND_BLOCK, n * BAND_BLOCK), bool)
  padded[:, :BAND_LEN, :BAND_LEN] = mask
  tiles = padded.reshape(3, n, BAND_BLOCK, n, BAND_BLOCK).any(axis=(0, 2, 4))
  offsets = {j - i for i, j in zip(*np.nonzero(tiles))}
  assert offsets == {-1, 0, 1}
  assert not mask[:, 36:].any() and not mask[1, 33:].any()


def test_band_matches_reference_values_and_gradients():
  seg, idx = _band_case()
  args = (seg, idx, seg, idx)
  assert bool(banded.band_is_exact(*args, BAND_BLOCK))
  q, k, v = _inputs(np.random.default_rng(4), b=3, sq=BAND_LEN, skv=BAND_LEN, h=4, hkv=2)
  _assert_is_reference(lambda q, k, v: banded.segment_attention(q, k, v, *args, BAND_BLOCK),
                       q, k, v, args)
  out = np.asarray(banded.segment_attention(q, k, v, *args, BAND_BLOCK))
  assert np.isfinite(out).all() and not out[1, 33:].any()  # padding: zeros, never NaN


def test_band_is_one_program_without_control_flow_or_saved_probabilities():
  """Forward and backward have no loop and no cond, and the VJP keeps no [B·n, H, block, window]
  array (what autodiff through the softmax would save)."""
  seg, idx = _band_case()
  args = (seg, idx, seg, idx)
  q, k, v = _inputs(np.random.default_rng(5), b=3, sq=BAND_LEN, skv=BAND_LEN, h=4, hkv=2)
  f = lambda q, k, v: banded.segment_attention(q, k, v, *args, BAND_BLOCK)
  text = str(jax.make_jaxpr(jax.grad(lambda *x: jnp.sum(f(*x)), argnums=(0, 1, 2)))(q, k, v))
  for primitive in ("cond[", "while[", "scan["):
    assert primitive not in text
  _, vjp = jax.vjp(f, q, k, v)
  window = banded.window_bytes(q.shape, BAND_BLOCK) // 4
  assert max(leaf.size for leaf in jax.tree.leaves(vjp)) < window


def test_band_is_not_exact_for_a_document_over_three_blocks():
  rows = [BAND_ROWS[0], [(0, 6, 1), (6, 18, 2), (18, 30, 3)], BAND_ROWS[2]]  # 6..18: blocks 0-2
  seg, idx = _band_case(rows)
  args = (seg, idx, seg, idx)
  assert not bool(banded.band_is_exact(*args, BAND_BLOCK))
  q, k, v = _inputs(np.random.default_rng(6), b=3, sq=BAND_LEN, skv=BAND_LEN, h=4, hkv=2)
  want = reference.segment_attention(q, k, v, *args)
  band = banded.segment_attention(q, k, v, *args, BAND_BLOCK)
  assert np.abs(np.asarray(band) - np.asarray(want))[1, 16:18].max() > 1e-3  # the band is wrong
  for impl in ("banded", "auto"):  # the dispatcher is not
    _assert_is_reference(
        lambda q, k, v, impl=impl: api.segment_attention(q, k, v, *args, implementation=impl,
                                                         block_q=BAND_BLOCK,
                                                         block_kv=BAND_BLOCK), q, k, v, args)


def test_dispatch_takes_the_band_where_it_is_exact(monkeypatch):
  seg, idx = _band_case()
  args = (seg, idx, seg, idx)
  q, k, v = _inputs(np.random.default_rng(8), b=3, sq=BAND_LEN, skv=BAND_LEN, h=4, hkv=2)
  ran = []
  monkeypatch.setattr(blockwise, "segment_attention",
                      lambda *a: ran.append("blockwise") or jnp.full(q.shape, jnp.nan))
  for impl in ("auto", "banded"):
    got = api.segment_attention(q, k, v, *args, implementation=impl, block_q=BAND_BLOCK,
                                block_kv=BAND_BLOCK)
    np.testing.assert_allclose(got, reference.segment_attention(q, k, v, *args), atol=2e-6)
  assert ran == ["blockwise", "blockwise"]  # traced as the untaken branch, never run
  got = api.segment_attention(q, k, v, *args, implementation="blockwise", block_q=BAND_BLOCK,
                              block_kv=BAND_BLOCK)
  assert np.isnan(np.asarray(got)).all()  # forced blockwise is blockwise alone


def test_band_over_budget_is_never_traced(monkeypatch):
  seg, idx = _band_case()
  args = (seg, idx, seg, idx)
  q, k, v = _inputs(np.random.default_rng(9), b=3, sq=BAND_LEN, skv=BAND_LEN, h=4, hkv=2)

  def traced(*a):
    raise AssertionError("the band was traced")

  monkeypatch.setattr(banded, "segment_attention", traced)
  call = lambda impl: api.segment_attention(q, k, v, *args, implementation=impl,
                                            block_q=BAND_BLOCK, block_kv=BAND_BLOCK)
  size = banded.window_bytes(q.shape, BAND_BLOCK)
  assert size == 3 * 40 * 4 * 3 * BAND_BLOCK * 4  # B · padded S · H · 3·block · 4 bytes
  monkeypatch.setattr(banded, "BAND_BUDGET_BYTES", size - 1)
  np.testing.assert_allclose(call("auto"), reference.segment_attention(q, k, v, *args),
                             atol=2e-6)
  with pytest.raises(AssertionError, match="the band was traced"):
    call("banded")  # forcing it ignores the budget
  monkeypatch.setattr(banded, "BAND_BUDGET_BYTES", size)
  with pytest.raises(AssertionError, match="the band was traced"):
    call("auto")
