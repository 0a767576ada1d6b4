"""The Flax Qwen3 backbone: building blocks against numpy oracles, parameter metadata, layouts, remat."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import config as cfglib
from msa_jax.data.batch import plain_prompt
from msa_jax.model.model import MSAForCausalLM, layer_blocks
from msa_jax.model.layers import RMSNorm
from msa_jax.model.param_layout import stack_layers, unstack_layers
from msa_jax.model.rope import apply_rope
from msa_jax.sharding import LOGICAL_RULES


def _tiny(**overrides):
  model_cfg, msa_cfg = cfglib.preset("tiny")
  return model_cfg.replace(compute_dtype="float32", **overrides), msa_cfg


def _init(model_cfg, msa_cfg, tokens):
  model = MSAForCausalLM(model_cfg, msa_cfg)
  return model, nn.unbox(jax.jit(model.init)(jax.random.key(0), plain_prompt(tokens))["params"])


def _logits(model, params, tokens, positions=None, segment_ids=None):
  return model.apply({"params": params}, plain_prompt(tokens, positions, segment_ids),
                     method=MSAForCausalLM.prompt_logits)[0]


def _apply(model, params, *args):
  return jax.jit(_logits, static_argnums=0)(model, params, *args)


def test_rope_matches_pairwise_rotation_oracle():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
  pos = np.array([[0, 1, 2, 100, 7], [19, 20, 21, 0, 5000]], np.int32)
  theta = 10_000.0
  got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), theta))
  want = np.empty_like(x)
  half = 4
  for i in range(half):  # HF rotate-half pairs dim i with dim i + D/2
    ang = pos[..., None].astype(np.float64) * theta ** (-2 * i / 8)
    c, s = np.cos(ang), np.sin(ang)
    want[..., i] = x[..., i] * c - x[..., i + half] * s
    want[..., i + half] = x[..., i + half] * c + x[..., i] * s
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_rmsnorm_matches_oracle():
  x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
  norm = RMSNorm(1e-6, "float32")
  params = {"params": {"scale": jnp.linspace(0.5, 1.5, 16)}}
  got = np.asarray(norm.apply(params, jnp.asarray(x)))
  want = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * np.linspace(0.5, 1.5, 16)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_every_parameter_has_logical_axis_names():
  model_cfg, msa_cfg = _tiny()
  for scan in (False, True):
    model = MSAForCausalLM(model_cfg.replace(scan_layers=scan), msa_cfg)
    boxed = jax.eval_shape(model.init, jax.random.key(0), plain_prompt(jnp.ones((1, 4), jnp.int32)))
    known = {name for name, _ in LOGICAL_RULES}
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for leaf in leaves:
      assert isinstance(leaf, nn.LogicallyPartitioned), leaf
      assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= known, leaf.names


def test_router_projections_only_in_router_layers():
  model_cfg, msa_cfg = _tiny()
  _, params = _init(model_cfg, msa_cfg, jnp.ones((1, 4), jnp.int32))
  for i in range(model_cfg.num_layers):
    attn = params[f"layers_{i}"]["attn"]
    if i in msa_cfg.router_layers:
      assert attn["router_q"]["kernel"].shape == (64, 4, 16)
      assert attn["router_k"]["kernel"].shape == (64, 2, 16)
    else:
      assert "router_q" not in attn and "router_k" not in attn


def test_layer_blocks():
  assert layer_blocks(6, (2, 3, 5)) == [(0, 2, False), (2, 4, True), (4, 5, False), (5, 6, True)]
  assert layer_blocks(3, ()) == [(0, 3, False)]


def test_scanned_equals_unscanned_and_layouts_round_trip():
  model_cfg, msa_cfg = _tiny()
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, model_cfg.vocab_size)
  decoder, params = _init(model_cfg, msa_cfg, tokens)
  stacked = stack_layers(params, model_cfg.num_layers, msa_cfg.router_layers)
  assert set(stacked) >= {"block_0_2", "block_2_4"}
  jax.tree.map(np.testing.assert_array_equal, unstack_layers(stacked), params)
  scanned = MSAForCausalLM(model_cfg.replace(scan_layers=True), msa_cfg)
  np.testing.assert_allclose(_apply(scanned, stacked, tokens),
                             _apply(decoder, params, tokens), atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_keeps_values_and_gradients(policy, scan):
  model_cfg, msa_cfg = _tiny(scan_layers=scan)
  tokens = jax.random.randint(jax.random.key(4), (2, 8), 0, model_cfg.vocab_size)
  decoder, params = _init(model_cfg, msa_cfg, tokens)
  remat = MSAForCausalLM(model_cfg.replace(remat_policy=policy), msa_cfg)

  def loss(d, p):
    return jnp.mean(_logits(d, p, tokens) ** 2)

  g_ref = jax.jit(jax.grad(lambda p: loss(decoder, p)))(params)
  g_remat = jax.jit(jax.grad(lambda p: loss(remat, p)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_remat, g_ref)


def test_padding_and_position_shift_invariance():
  model_cfg, msa_cfg = _tiny()
  row = jax.random.randint(jax.random.key(5), (1, 7), 0, model_cfg.vocab_size)
  decoder, params = _init(model_cfg, msa_cfg, row)
  alone = _apply(decoder, params, row)
  padded = jnp.concatenate([row, jnp.zeros((1, 5), jnp.int32)], axis=1)
  seg = jnp.concatenate([jnp.ones((1, 7), jnp.int32), jnp.zeros((1, 5), jnp.int32)], axis=1)
  got = _apply(decoder, params, padded, None, seg)
  np.testing.assert_allclose(got[:, :7], alone, atol=1e-5)
  assert np.isfinite(np.asarray(got)).all()
  # RoPE is relative: shifting every position by a constant leaves the logits unchanged
  shifted = _apply(decoder, params, row, jnp.arange(7)[None] + 19)
  np.testing.assert_allclose(shifted, alone, atol=1e-4)


def test_bf16_compute_with_bf16_and_f32_params():
  model_cfg, msa_cfg = _tiny()
  tokens = jax.random.randint(jax.random.key(6), (2, 8), 0, model_cfg.vocab_size)
  _, params32 = _init(model_cfg, msa_cfg, tokens)
  reference = _apply(MSAForCausalLM(model_cfg, msa_cfg), params32, tokens)
  for param_dtype in ("float32", "bfloat16"):
    cfg = model_cfg.replace(compute_dtype="bfloat16", param_dtype=param_dtype)
    decoder = MSAForCausalLM(cfg, msa_cfg)
    params = jax.tree.map(lambda x: x.astype(param_dtype), params32)
    abstract = jax.eval_shape(decoder.init, jax.random.key(0), plain_prompt(tokens))
    assert abstract["params"]["layers_0"]["mlp"]["up_proj"]["kernel"].value.dtype == param_dtype
    logits = _apply(decoder, params, tokens)
    assert logits.dtype == jnp.bfloat16
    # bf16 has ~3 significant digits: a sanity bound on the error, relative to the logit scale
    scale = float(jnp.abs(reference).max())
    assert float(jnp.abs(logits.astype(jnp.float32) - reference).max()) < 0.05 * scale


@pytest.mark.parametrize("scan", [False, True])
def test_profiles_name_layers_blocks_and_streams(scan):
  """`jax.named_scope` per layer (or scanned block) and per stream/step reaches the lowered program."""
  from tests.msa_fixtures import make_batch, random_samples
  model_cfg, msa_cfg = cfglib.preset("tiny")
  samples = random_samples(np.random.default_rng(0), [[5, 9, 3], [12, 4]])
  memory, prompt = make_batch(samples, msa_cfg)
  model = MSAForCausalLM(model_cfg.replace(scan_layers=scan), msa_cfg)
  params = jax.eval_shape(model.init, jax.random.key(0), prompt, memory)
  text = jax.jit(lambda p: model.apply(p, prompt, memory).hidden).lower(params).as_text(
      debug_info=True)
  first = "block_0_2" if scan else "layer_0"
  for name in (first, "memory_stream", "prompt_stream", "route", "gather"):
    assert name in text, name


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bf16_embedding_gradient_accumulates_in_float32(param_dtype):
  """The embedding's forward is the bf16-cast table row, and its gradient (a scatter-add of each
  token's cotangent into the table) sums colliding rows in float32: 4,096 tokens over 8 rows,
  against a float64 np.add.at oracle. Summed in bf16 (8 significant bits) such sums are off by
  ~1e-2 relative; float32 leaves ~1e-6."""
  model_cfg, msa_cfg = cfglib.preset("tiny")
  model_cfg = model_cfg.replace(compute_dtype="bfloat16", param_dtype=param_dtype)
  model = MSAForCausalLM(model_cfg, msa_cfg)
  tokens = jax.random.randint(jax.random.key(1), (4, 1024), 0, 8)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), plain_prompt(tokens[:, :8]))["params"])
  table = params["embed_tokens"]["embedding"]
  cotangent = jax.random.normal(jax.random.key(2), tokens.shape + (model_cfg.hidden_size,),
                                jnp.bfloat16)

  def embed(table):
    p = {**params, "embed_tokens": {"embedding": table}}
    return model.apply({"params": p}, tokens, method=lambda m, t: m._embed(t))

  x, vjp = jax.vjp(embed, table)
  assert x.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(x, np.float32),
                                np.asarray(table.astype(jnp.bfloat16)[tokens], np.float32))
  (grad,) = vjp(cotangent)
  assert grad.dtype == table.dtype
  oracle = np.zeros(table.shape, np.float64)
  np.add.at(oracle, np.asarray(tokens).ravel(),
            np.asarray(cotangent, np.float64).reshape(-1, model_cfg.hidden_size))
  rtol = 1e-5 if param_dtype == "float32" else 2 ** -8  # a bf16 table rounds the float32 sum once
  np.testing.assert_allclose(np.asarray(grad, np.float64), oracle, rtol=rtol,
                             atol=rtol * np.abs(oracle).max())
