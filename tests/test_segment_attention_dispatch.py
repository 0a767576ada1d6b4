"""Segment-attention dispatch: the causal layout kept kernels take equals the reference mask where it
claims to, the cuDNN argument translation (run through jax.nn's XLA implementation with the same
arguments) and splash (TPU interpret mode) match the reference in values and gradients, and the
registry picks, forces and falls back (warning once) as documented."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax.kernels.segment_attention import api, blockwise, cudnn, layout, reference, splash


def _qkv(rng, b, sq, skv, h, hkv, d):
  q = rng.standard_normal((b, sq, h, d)).astype(np.float32)
  k = rng.standard_normal((b, skv, hkv, d)).astype(np.float32)
  v = rng.standard_normal((b, skv, hkv, d)).astype(np.float32)
  return q, k, v


def _rows(s, spans_per_row):
  seg = np.zeros((len(spans_per_row), s), np.int32)
  for row, spans in enumerate(spans_per_row):
    for start, end, doc in spans:
      seg[row, start:end] = doc
  return seg, np.broadcast_to(np.arange(s, dtype=np.int32), seg.shape).copy()


def _prompt_case(rng, sq, n_chunks, firsts, prompt_len):
  """[chunks | prompt]: chunk slot selected or not, chunks at each row's first memory-seeing
  index, prompt rows of prompt_len live tokens then padding."""
  b = len(firsts)
  q_seg, q_idx = _rows(sq, [[(0, n, 1)] for n in prompt_len])
  selected = (rng.random((b, n_chunks)) < 0.6).astype(np.int32)
  kv_seg = np.concatenate([selected, q_seg], axis=1)
  kv_idx = np.concatenate([np.repeat(np.asarray(firsts, np.int32)[:, None], n_chunks, 1), q_idx],
                          axis=1)
  return q_seg, q_idx, kv_seg, kv_idx


def _layout_mask(lay, sq, skv):
  """The mask causal-over-the-layout means, in the original query/key order."""
  place_k = np.argsort(np.asarray(lay.key_order), axis=1)
  place_q = np.asarray(lay.q_place)
  live_k = place_k < np.asarray(lay.length)[:, None]
  return (np.asarray(lay.query_live)[:, :, None] & live_k[:, None, :]
          & (place_k[:, None, :] <= place_q[:, :, None]))


LAYOUT_CASES = {
    # template heads of 3 and 0 tokens, a padded prompt, an all-chunks-unselected row
    "prompt_over_chunks": lambda rng: _prompt_case(rng, 10, 12, [3, 0, 10], [10, 7, 10]),
    "prompt_alone": lambda rng: _rows(9, [[(0, 9, 1)], [(0, 4, 1)]]) * 2,
    "one_document_a_row": lambda rng: _rows(16, [[(0, 16, 3)], [(0, 11, 1)], []]) * 2,
}


@pytest.mark.parametrize("name", sorted(LAYOUT_CASES))
def test_causal_layout_is_the_reference_mask(name):
  q_seg, q_idx, kv_seg, kv_idx = LAYOUT_CASES[name](np.random.default_rng(0))
  if name == "prompt_over_chunks":
    kv_seg[2, :12] = 0  # a row that selected nothing
  lay = layout.causal_layout(*map(jnp.asarray, (q_seg, q_idx, kv_seg, kv_idx)))
  assert bool(lay.ok)
  want = np.asarray(reference.segment_mask(q_seg, q_idx, kv_seg, kv_idx))
  np.testing.assert_array_equal(_layout_mask(lay, q_seg.shape[1], kv_seg.shape[1]), want)


def test_causal_layout_refuses_what_it_cannot_express():
  seg, idx = _rows(16, [[(0, 8, 1), (8, 16, 2)]])  # two documents in a row
  assert not bool(layout.causal_layout(seg, idx, seg, idx).ok)
  # decode: two new queries at cache slots 5, 6 of an 8-slot cache (not the keys' tail)
  q_seg, q_idx = np.ones((1, 2), np.int32), np.array([[5, 6]], np.int32)
  kv_seg, kv_idx = np.array([[1] * 7 + [0]], np.int32), np.arange(8, dtype=np.int32)[None]
  assert not bool(layout.causal_layout(q_seg, q_idx, kv_seg, kv_idx).ok)
  seg, idx = _rows(4, [[(0, 4, 1)]])
  assert not bool(layout.causal_layout(seg, idx[:, ::-1], seg, idx[:, ::-1]).ok)  # idx decrease


def _check_values_and_grads(f, q, k, v, args, atol_out, atol_grad):
  rng = np.random.default_rng(9)
  ct = rng.standard_normal(q.shape).astype(np.float32)
  f_ref = lambda q, k, v: reference.segment_attention(q, k, v, *args)
  np.testing.assert_allclose(jax.jit(f)(q, k, v), f_ref(q, k, v), atol=atol_out)
  loss = lambda g: (lambda *x: jnp.sum(g(*x).astype(jnp.float32) * ct))
  got = jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(f_ref), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=atol_grad)


@pytest.mark.parametrize("name", sorted(LAYOUT_CASES))
def test_cudnn_arguments_give_the_reference(name):
  """What cuDNN is passed (permuted q/k/v, is_causal, both sequence lengths), run by jax.nn's XLA
  implementation, equals the reference in values and gradients."""
  rng = np.random.default_rng(1)
  args = LAYOUT_CASES[name](rng)
  q, k, v = _qkv(rng, args[0].shape[0], args[0].shape[1], args[2].shape[1], 4, 2, 8)
  lay = layout.causal_layout(*map(jnp.asarray, args))
  f = lambda q, k, v: cudnn.causal_attention(q, k, v, lay, implementation="xla")
  _check_values_and_grads(f, q, k, v, args, 2e-6, 1e-5)
  if name == "prompt_over_chunks":  # the dispatching entry point takes this branch on device
    got = cudnn.segment_attention(q, k, v, *args, 4, 8, implementation="xla")
    np.testing.assert_allclose(got, reference.segment_attention(q, k, v, *args), atol=2e-6)


def test_cudnn_path_falls_back_on_device_for_packed_documents():
  rng = np.random.default_rng(2)
  seg, idx = _rows(37, [[(0, 10, 1), (10, 30, 2)], [(0, 5, 1), (5, 36, 3)]])
  q, k, v = _qkv(rng, 2, 37, 37, 4, 2, 8)
  f = lambda q, k, v: cudnn.segment_attention(q, k, v, seg, idx, seg, idx, 8, 8,
                                              implementation="xla")
  _check_values_and_grads(f, q, k, v, (seg, idx, seg, idx), 2e-6, 1e-5)


SPLASH_CASES = {
    "documents": lambda rng: _rows(128, [[(0, 40, 1), (40, 100, 2)], [(0, 128, 1)]]) * 2,
    "prompt_over_chunks": lambda rng: _prompt_case(rng, 96, 32, [5, 0], [96, 60]),
}


@pytest.mark.parametrize("name", sorted(SPLASH_CASES))
def test_splash_interpret_matches_reference(name):
  rng = np.random.default_rng(3)
  args = SPLASH_CASES[name](rng)
  q, k, v = _qkv(rng, 2, args[0].shape[1], args[2].shape[1], 2, 1, 128)
  assert splash.unsupported(q.shape, k.shape, backend="cpu", interpret=True) is None
  f = lambda q, k, v: splash.segment_attention(q, k, v, *args, 64, 64, interpret=True)
  _check_values_and_grads(f, q, k, v, args, 1e-5, 1e-4)


def test_auto_picks_by_backend(monkeypatch):
  assert api.resolve("auto") == "blockwise"  # CPU: the default behaviour is unchanged
  for backend, name in (("gpu", "cudnn"), ("tpu", "splash"), ("cpu", "blockwise")):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert api.resolve("auto") == name
  assert api.resolve("reference") == "reference"


def _calls(monkeypatch):
  called = []
  for module in (blockwise, cudnn, splash):
    original = module.segment_attention
    def record(*a, _m=module, _o=original, **kw):
      called.append(_m.__name__.rsplit(".", 1)[-1])
      return _o(*a, **kw) if _m is not cudnn else _o(*a, **kw, implementation="xla")
    monkeypatch.setattr(module, "segment_attention", record)
  return called


def test_auto_on_a_gpu_runs_cudnn_for_bf16(monkeypatch):
  called = _calls(monkeypatch)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  seg, idx = _rows(16, [[(0, 16, 1)]])
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _qkv(np.random.default_rng(4), 1, 16, 16,
                                                         4, 2, 8))
  got = api.segment_attention(q, k, v, seg, idx, seg, idx)
  assert called == ["cudnn", "blockwise"]  # blockwise: the on-device fallback branch, traced
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(
      reference.segment_attention(q, k, v, seg, idx, seg, idx), np.float32), atol=2e-2)


def test_forced_kernel_falls_back_warning_once_per_reason(monkeypatch):
  called = _calls(monkeypatch)
  monkeypatch.setattr(api, "_warned", set())
  seg, idx = _rows(16, [[(0, 16, 1)]])
  q, k, v = _qkv(np.random.default_rng(5), 1, 16, 16, 4, 2, 8)
  with pytest.warns(UserWarning, match="cudnn cannot run this call .cuDNN needs a GPU"):
    got = api.segment_attention(q, k, v, seg, idx, seg, idx, implementation="cudnn",
                                block_q=8, block_kv=8)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    api.segment_attention(q, k, v, seg, idx, seg, idx, implementation="cudnn", block_q=8,
                          block_kv=8)
  with pytest.warns(UserWarning, match="splash needs head_dim a multiple of 128, got 8"):
    api.segment_attention(q, k, v, seg, idx, seg, idx, implementation="splash")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.warns(UserWarning, match="bfloat16/float16, got float32"):
    api.segment_attention(q, k, v, seg, idx, seg, idx, implementation="auto")
  assert called == ["blockwise"] * 4
  np.testing.assert_allclose(got, reference.segment_attention(q, k, v, seg, idx, seg, idx),
                             atol=2e-6)


def test_model_default_is_auto():
  from msa_jax.model.model import MSAForCausalLM
  assert MSAForCausalLM.__dataclass_fields__["attention_impl"].default == "auto"


def test_splash_lowers_for_a_tpu():
  """msa-4b head shapes over a 1K-token memory row: the splash branch lowers to Mosaic TPU here
  (compiling it needs the device)."""
  b, s, h, hkv, d = 1, 1024, 32, 8, 128
  shapes = (jax.ShapeDtypeStruct((b, s, h, d), jnp.bfloat16),
            *(jax.ShapeDtypeStruct((b, s, hkv, d), jnp.bfloat16),) * 2,
            *(jax.ShapeDtypeStruct((b, s), jnp.int32),) * 4)
  fn = jax.jit(lambda *x: splash.segment_attention(*x, 512, 512))
  text = fn.trace(*shapes).lower(lowering_platforms=("tpu",)).as_text()
  assert "tpu_custom_call" in text


def test_xla_tiles_are_cut_to_the_sequence():
  assert [api.fitted_block(512, n) for n in (1, 2, 3, 128, 129, 512, 4096)] == [
      1, 2, 4, 128, 256, 512, 512]
  assert api.fitted_block(64, 1000) == 64
