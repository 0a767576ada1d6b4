"""The fused routing kernels (msa_jax/kernels/routing/) equal the reference in interpret mode on CPU:
every head, query and chunk reduction and score mode, float32/bf16/int8 keys, ragged documents
that run over several key tiles and partitions, exact ties, a request with no route token, empty
slots, fewer documents than k, and long prompts over several token tiles; the api picks and falls
back; every matmul stays inside the kernel's bound at the long-prompt shape that overran an H100's
shared memory; and both kernels lower for their hardware (Mosaic TPU, Triton for CUDA) at msa-4b
shapes."""

import warnings

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import config as cfglib
from msa_jax.kernels.routing import api, pallas_gpu, pallas_tpu, reference
from msa_jax.model import router, router_keys
from tests.bank_fixtures import random_keys

HKV, D, H = 2, 16, 4
# one 13-chunk document over several tiles, one-chunk ones; 7 and 10 copy 4, 9 copies 2 (ties)
COUNTS = [1, 13, 2, 3, 1, 6, 1, 1, 4, 2, 1, 3]
TIES = [(4, 7), (4, 10), (2, 9)]
SLOTS = 48  # 38 chunks, then empty slots
KERNELS = {
    # tiles of 8 chunks; GPU: 3 partitions and request blocks of 2 (4 requests: 2 blocks)
    "pallas_gpu": lambda *a: pallas_gpu.top_k_documents(*a, interpret=True, block_chunks=8,
                                                        block_rows=2, partitions=3),
    "pallas_tpu": lambda *a: pallas_tpu.top_k_documents(*a, interpret=True, block_chunks=8,
                                                        block_rows=2),
}
# (config overrides, coupled scaling, key dtype): every reduction, score mode and key dtype
CASES = [
    (dict(), False, "float32"),
    (dict(head_reduce="max", query_reduce="mean", chunk_reduce="mean", score_mode="scaled_dot"),
     False, "bfloat16"),
    (dict(query_reduce="last", chunk_reduce="mean"), True, "int8"),
    (dict(head_reduce="max", query_reduce="last", score_mode="scaled_dot"), False, "int8"),
    (dict(query_reduce="mean"), False, "bfloat16"),
    (dict(head_reduce="max", chunk_reduce="mean"), True, "float32"),
]


def _shard(rng, counts, slots, key_dtype, cfg, ties=()):
  keys, offsets = random_keys(rng, counts, HKV, D, ties=ties)
  keys = np.concatenate([keys, np.zeros((slots - len(keys), HKV, D), np.float32)])
  chunk_doc = np.zeros(slots, np.int32)
  chunk_doc[:offsets[-1]] = np.repeat(np.arange(1, len(counts) + 1), counts)
  values, scale = router_keys.prepare(*router_keys.quantize(keys, key_dtype), cfg)
  return keys, offsets, values, scale, chunk_doc


def _queries(rng, keys, offsets, cfg, coupled, b=4, t=5, prefer=4):
  q_r = rng.standard_normal((b, t, H, D)).astype(np.float32)
  q_r[0] = np.repeat(keys[offsets[prefer]], H // HKV, axis=0)  # row 0 prefers document `prefer`
  mask = rng.random((b, t)) < 0.6
  mask[:, 1] = True
  mask[-1] = False  # no route token: every score ties (-inf or 0), the lowest columns win
  return router.prepare_queries(q_r, cfg, coupled_scale=coupled), mask


def _check(got, want):
  (scores, columns, found), (ref_scores, ref_columns, ref_found) = map(
      lambda x: [np.asarray(a) for a in x], (got, want))
  np.testing.assert_array_equal(found, ref_found)
  np.testing.assert_array_equal(np.where(found, columns, -1), np.where(ref_found, ref_columns, -1))
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("overrides,coupled,key_dtype", CASES)
def test_kernel_equals_the_reference(kernel, overrides, coupled, key_dtype):
  rng = np.random.default_rng(len(str(overrides)) + coupled)
  cfg = cfglib.MSAConfig(top_k_docs=4, **overrides)
  keys, offsets, values, scale, chunk_doc = _shard(rng, COUNTS, SLOTS, key_dtype, cfg, TIES)
  q, mask = _queries(rng, keys, offsets, cfg, coupled)
  args = (q, mask, values, scale, chunk_doc, len(COUNTS), cfg, cfg.top_k_docs)
  want = reference.top_k_documents(*args)
  got = jax.jit(KERNELS[kernel], static_argnums=(5, 6, 7))(*args)
  _check(got, want)
  assert {4, 7, 10} <= set(np.asarray(got[1][0]).tolist())  # ties go to the lower columns
  assert np.asarray(got[1][-1]).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("kernel", KERNELS)
def test_fewer_documents_than_k(kernel):
  rng = np.random.default_rng(7)
  cfg = cfglib.MSAConfig(top_k_docs=8, chunk_reduce="mean")
  keys, offsets, values, scale, chunk_doc = _shard(rng, [3, 1, 9], 16, "bfloat16", cfg)
  q, mask = _queries(rng, keys, offsets, cfg, False, b=2, t=3, prefer=1)
  args = (q, mask, values, scale, chunk_doc, 3, cfg, cfg.top_k_docs)
  got = KERNELS[kernel](*args)
  _check(got, reference.top_k_documents(*args))
  assert np.asarray(got[2]).sum(1).tolist() == [3, 3] and got[0].shape == (2, 3)


# (prompt length T, batch, config overrides, key dtype). At head_dim 16 the GPU's token tiles are
# 256 rows, the TPU's 512: T 300 and 1024 pad to 512 and 1024 tokens, two and four GPU tiles a
# request (TPU: one and two); T 100 with the chunk mean (GPU blocks of 16 requests), or a batch of 8
# (TPU blocks of 8), puts several whole requests in each of several tiles.
LONG_CASES = [
    (1024, 4, dict(), "float32"),
    (300, 4, dict(head_reduce="max", query_reduce="last"), "bfloat16"),
    (1024, 4, dict(head_reduce="max", query_reduce="mean", score_mode="scaled_dot"), "int8"),
    (300, 4, dict(query_reduce="mean", chunk_reduce="mean"), "bfloat16"),
    (100, 8, dict(head_reduce="max", query_reduce="last", chunk_reduce="mean"), "float32"),
    (100, 8, dict(), "bfloat16"),
]
LONG_KERNELS = {  # the kernels' own request blocks and token tiles
    "pallas_gpu": lambda *a: pallas_gpu.top_k_documents(*a, interpret=True, block_chunks=8,
                                                        partitions=3),
    "pallas_tpu": lambda *a: pallas_tpu.top_k_documents(*a, interpret=True, block_chunks=8),
}


@pytest.mark.parametrize("kernel", LONG_KERNELS)
@pytest.mark.parametrize("t,b,overrides,key_dtype", LONG_CASES)
def test_long_prompts_equal_the_reference(kernel, t, b, overrides, key_dtype):
  """Token tiles combine exactly: route tokens only in a request's first or only in its last
  token tile, the last route token far from the end, no route token at all."""
  rng = np.random.default_rng(t + b + len(str(overrides)))
  cfg = cfglib.MSAConfig(top_k_docs=4, **overrides)
  keys, offsets, values, scale, chunk_doc = _shard(rng, COUNTS, SLOTS, key_dtype, cfg, TIES)
  q, mask = _queries(rng, keys, offsets, cfg, False, b=b, t=t)
  mask[1, :-20] = False  # request 1 routes from its last tokens only, request 2 from its first
  mask[2, 20:] = False
  args = (q, mask, values, scale, chunk_doc, len(COUNTS), cfg, cfg.top_k_docs)
  got = jax.jit(LONG_KERNELS[kernel], static_argnums=(5, 6, 7))(*args)
  _check(got, reference.top_k_documents(*args))
  assert {4, 7, 10} <= set(np.asarray(got[1][0]).tolist())
  assert np.asarray(got[1][-1]).tolist() == [0, 1, 2, 3]


def _dots(jaxpr):
  """The (lhs, rhs, result) avals of each matmul in `jaxpr` and the jaxprs inside it (kernels,
  loops)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield tuple(v.aval for v in (*eqn.invars, *eqn.outvars))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          sub = sub.jaxpr
        if isinstance(sub, jax.extend.core.Jaxpr):
          yield from _dots(sub)


@pytest.mark.parametrize("kernel,key_dtype,rows,tile_bytes", [
    # rows by head reduction. The shape at T 2048 on GPUs (2026-12-07): bf16 keys, head max,
    # asked 279,552 bytes of shared memory at 256 rows (H100); float32 keys asked 295,936 at 256
    # with the head mean (H200) and ran at 128 with the head max (H100)
    (pallas_gpu, jnp.bfloat16, {"mean": 256, "max": 128}, 64 * 1024),
    (pallas_gpu, jnp.float32, {"mean": 128, "max": 128}, 64 * 1024),
    (pallas_tpu, jnp.float32, {"mean": 512, "max": 512}, 128 * 1024)])
@pytest.mark.parametrize("t", [300, 2048])
@pytest.mark.parametrize("overrides", [dict(), dict(head_reduce="max", chunk_reduce="mean")])
def test_matmuls_stay_bounded_for_long_prompts(kernel, key_dtype, rows, tile_bytes, t, overrides):
  """The demo's tiny model at batch 8 (head_dim 32, 8 query / 4 KV heads): a whole
  [block_rows·T, D] query operand, [2048, 32] f32 for 4 requests of 512 tokens, with its bf16 key
  tile overran the 232448 bytes of shared memory an H100 block has. Now each score matmul takes a
  token tile of at most `rows` queries and `tile_bytes` whatever T; on GPU its operands leave room
  for Triton's second pipeline stage, and its [64, 256] f32 score tile is 128 registers a thread."""
  cfg = cfglib.MSAConfig(top_k_docs=16, **overrides)
  rows = rows[cfg.head_reduce]
  b, h, hkv, d, c = 8, 8, 4, 32, 1024
  shapes = (jax.ShapeDtypeStruct((b, t, h, d), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.bool_),
            jax.ShapeDtypeStruct((c, hkv, d), key_dtype), None,
            jax.ShapeDtypeStruct((c,), jnp.int32))
  fn = lambda q, m, k, s, cd: kernel.top_k_documents(q, m, k, s, cd, 100, cfg, 16)
  dots = list(_dots(jax.make_jaxpr(fn)(*shapes).jaxpr))
  scores = [(lhs, rhs, out) for lhs, rhs, out in dots if rhs.shape[1] == d]
  assert scores and {rhs.shape for _, rhs, _ in scores} == {(rows, d)}  # full tiles, no larger
  nbytes = lambda a: a.size * a.dtype.itemsize
  assert all(nbytes(rhs) <= tile_bytes for _, rhs, _ in dots)
  if kernel is pallas_gpu:
    assert all(2 * (nbytes(lhs) + nbytes(rhs)) <= 232448 and nbytes(out) <= 64 * 1024
               for lhs, rhs, out in dots)


def test_unsupported_names_a_head_dim_too_wide_for_the_query_tile(monkeypatch):
  """16 query rows (Triton's smallest dot; a bf16 sublane tile) must fit the query tile, and on
  GPU a key tile's operands must fit the shared memory; the demo's shape does."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  gpu = lambda shape, dtype, heads: pallas_gpu.unsupported(shape, dtype, interpret=False,
                                                           query_heads=heads)
  assert gpu((1024, 4, 32), jnp.float32, 8) is None
  assert "head_dim 2048 leaves fewer than 16 query rows" in gpu((1024, 4, 2048), jnp.float32, 4)
  # float32 keys at msa-4b's 8 KV heads of 128 asked 524,288 bytes at 64 query rows (H200)
  assert ("float32 keys of 8 KV heads x 128 with 8 query operands need more than 232448 bytes"
          in gpu((1024, 8, 128), jnp.float32, 8))
  assert gpu((1024, 8, 128), jnp.bfloat16, 8) is None  # msa-4b, head mean
  assert "bfloat16 keys of 8 KV heads x 128 with 32 query operands" in gpu(
      (1024, 8, 128), jnp.bfloat16, 32)  # msa-4b, head max: the reference
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  tpu = lambda shape, dtype: pallas_tpu.unsupported(shape, dtype, interpret=False, query_heads=8)
  assert tpu((1024, 4, 4096), jnp.int8) is None
  assert "head_dim 4096 leaves fewer than 16 query rows" in tpu((1024, 4, 4096), jnp.float32)


def test_shared_memory_bound_matches_the_measured_asks():
  """`pallas_gpu.shared_bytes` against what Triton asked on H100/H200 (2026-12-07, Ct 64): exact
  where the score buffers are staged (D 32), above the asks where they were not (D 128); and the
  rows it picks ran there."""
  assert pallas_gpu.shared_bytes(4, 4, 32, 4, 64, 256) == 295936  # float32, head mean
  assert pallas_gpu.shared_bytes(4, 8, 32, 2, 64, 256) == 279552  # bf16, head max
  assert pallas_gpu.shared_bytes(8, 8, 128, 4, 64, 64) >= 524288
  assert pallas_gpu.shared_bytes(8, 8, 128, 4, 64, 128) >= 786944
  assert pallas_gpu.query_rows((1024, 4, 32), jnp.bfloat16, 64, 4) == 256  # ran, 1.0 ms
  assert pallas_gpu.query_rows((1024, 4, 32), jnp.bfloat16, 64, 8) == 128
  assert pallas_gpu.query_rows((1024, 4, 32), jnp.float32, 64, 4) == 128  # ran, 22.8 ms
  assert pallas_gpu.query_rows((1024, 4, 32), jnp.float32, 64, 8) == 128  # ran, 75 ms


def test_api_picks_by_backend_and_falls_back_once(monkeypatch):
  assert api.resolve("auto") == "reference"  # CPU
  with pytest.raises(ValueError, match="unknown routing implementation"):
    api.resolve("cuda")
  rng = np.random.default_rng(8)
  cfg = cfglib.MSAConfig(top_k_docs=3)
  keys, offsets, values, scale, chunk_doc = _shard(rng, [2, 1, 3, 1], 8, "float32", cfg)
  q, mask = _queries(rng, keys, offsets, cfg, False, b=2, t=3, prefer=2)
  args = (q, mask, values, scale, chunk_doc, 4, cfg, 3)
  want = reference.top_k_documents(*args)
  _check(api.top_k_documents(*args, implementation="pallas_tpu"), want)  # interpret mode on CPU
  monkeypatch.setattr(pallas_gpu, "unsupported", lambda *a, **k: "head_dim 12 is not ...")
  monkeypatch.setattr(api, "_warned", set())
  with pytest.warns(UserWarning, match="pallas_gpu cannot run this call .*using the reference"):
    _check(api.top_k_documents(*args, implementation="pallas_gpu"), want)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # warned once per reason
    _check(api.top_k_documents(*args, implementation="pallas_gpu"), want)


@pytest.mark.parametrize("kernel,platform", [(pallas_gpu, "cuda"), (pallas_tpu, "tpu")])
@pytest.mark.parametrize("overrides", [
    dict(), dict(head_reduce="max", query_reduce="mean", chunk_reduce="mean"),
    dict(query_reduce="last")])
@pytest.mark.parametrize("key_dtype", [jnp.float32, jnp.bfloat16, jnp.int8])
@pytest.mark.parametrize("batch", [1, 16])
def test_kernels_lower_for_their_hardware(kernel, platform, overrides, key_dtype, batch):
  """msa-4b routing shapes: Pallas lowers the kernel to Triton IR or Mosaic TPU here (compiling
  it needs the device: the GPU and TPU sessions run them)."""
  hkv, d, h, t, c = 8, 128, 32, 64, 4096
  cfg = cfglib.MSAConfig(top_k_docs=16, **overrides)
  shapes = (jax.ShapeDtypeStruct((batch, t, h, d), jnp.float32),
            jax.ShapeDtypeStruct((batch, t), jnp.bool_),
            jax.ShapeDtypeStruct((c, hkv, d), key_dtype),
            jax.ShapeDtypeStruct((c, hkv), jnp.float32) if key_dtype == jnp.int8 else None,
            jax.ShapeDtypeStruct((c,), jnp.int32))
  fn = jax.jit(lambda q, m, k, s, cd: kernel.top_k_documents(q, m, k, s, cd, 1000, cfg, 16))
  text = fn.trace(*shapes).lower(lowering_platforms=(platform,)).as_text()
  assert ("xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") in text
