"""The fused routing kernels (msa_jax/kernels/routing/) equal the reference in interpret mode on CPU:
every head, query and chunk reduction and score mode, float32/bf16/int8 keys, ragged documents
that run over several key tiles and partitions, exact ties, a request with no route token, empty
slots, and fewer documents than k; the api picks and falls back; and both kernels lower for their
hardware (Mosaic TPU, Triton for CUDA) at msa-4b shapes."""

import warnings

import jax
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
