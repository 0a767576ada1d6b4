"""Depth growth (msa_jax/training/grow.py): the grown model computes what the original does, the
new layers are random but for their zeroed write-backs, and the router layers move with their
weights."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from msa_jax import config as cfglib
from msa_jax.model.model import MSAForCausalLM
from msa_jax.training.grow import grow_depth, grown_configs
from tests.msa_fixtures import make_batch, random_samples

DOCS = [[9, 3, 6, 11], [5, 12]]  # document lengths of two samples


def _small(**msa):
  model_cfg, msa_cfg = cfglib.preset("tiny")
  return model_cfg.replace(compute_dtype="float32"), msa_cfg.replace(**msa)


def _forward(model_cfg, msa_cfg, params, memory, prompt):
  model = MSAForCausalLM(model_cfg, msa_cfg)
  return jax.jit(lambda p: model.apply({"params": p}, prompt, memory,
                                       method=MSAForCausalLM.prompt_logits))(params)


@pytest.fixture(scope="module")
def original():
  """A random tiny model (norm scales random too, so an identity that only holds for unit norms
  would fail), a batch, and its forward outputs."""
  model_cfg, msa_cfg = _small()
  memory, prompt = make_batch(random_samples(np.random.default_rng(0), DOCS), msa_cfg)
  model = MSAForCausalLM(model_cfg, msa_cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(1), prompt, memory)["params"])
  params = jax.tree.map(lambda x: x * (1.0 + 0.3 * np.random.default_rng(2).standard_normal(
      x.shape).astype(x.dtype)) if x.ndim == 1 else x, params)
  return model_cfg, msa_cfg, params, memory, prompt, _forward(model_cfg, msa_cfg, params, memory,
                                                              prompt)


@pytest.mark.parametrize("after,count", [(-1, 1), (1, 2)])  # (1, 2): right before a router layer
def test_grown_model_computes_the_same_logits_and_router_scores(original, after, count):
  model_cfg, msa_cfg, params, memory, prompt, (logits, out) = original
  grown, g_model, g_msa = grow_depth(params, model_cfg, msa_cfg, after=after, count=count, seed=3)
  assert g_model.num_layers == model_cfg.num_layers + count
  assert sorted(k for k in grown if k.startswith("layers_")) == sorted(
      f"layers_{i}" for i in range(g_model.num_layers))
  g_logits, g_out = _forward(g_model, g_msa, grown, memory, prompt)
  valid = np.asarray(prompt.segment_ids).astype(bool)
  np.testing.assert_allclose(np.asarray(g_logits)[valid], np.asarray(logits)[valid], atol=1e-5)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(g_out)):
    np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), atol=1e-5)
  for i in range(after + 1, after + 1 + count):  # new layers: random, with zero write-backs
    new = grown[f"layers_{i}"]
    assert not np.any(new["attn"]["o_proj"]["kernel"]) and not np.any(new["mlp"]["down_proj"]["kernel"])
    # What feeds the zeroed projections is random, so their gradients are not zero and the layer
    # can learn (zeroing v_proj or up_proj as well would leave it dead).
    for block, proj in [("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj"),
                        ("mlp", "gate_proj"), ("mlp", "up_proj")]:
      assert np.std(new[block][proj]["kernel"]) > 0, (block, proj)
    assert "router_q" not in new["attn"]


def test_router_layers_move_with_their_weights(original):
  model_cfg, msa_cfg, params = original[:3]
  assert msa_cfg.router_layers, "the tiny preset has router layers"
  after = min(msa_cfg.router_layers) - 1
  grown, _, g_msa = grow_depth(params, model_cfg, msa_cfg, after=after, count=2)
  assert g_msa.router_layers == tuple(i + 2 for i in msa_cfg.router_layers)
  for old, new in zip(msa_cfg.router_layers, g_msa.router_layers):
    np.testing.assert_array_equal(grown[f"layers_{new}"]["attn"]["router_k"]["kernel"],
                                  params[f"layers_{old}"]["attn"]["router_k"]["kernel"])


def test_aux_loss_min_layer_keeps_selecting_the_same_router_layers():
  model_cfg, msa_cfg = _small()
  top = max(msa_cfg.router_layers)
  _, g_msa = grown_configs(model_cfg, msa_cfg.replace(aux_loss_min_layer=top), after=0, count=3)
  assert g_msa.aux_loss_min_layer == top + 3 and max(g_msa.router_layers) == top + 3
  _, g_msa = grown_configs(model_cfg, msa_cfg, after=model_cfg.num_layers - 1, count=1)
  assert g_msa.router_layers == msa_cfg.router_layers


@pytest.mark.parametrize("after,count,message", [(-2, 1, "after must name a layer"),
                                                 (99, 1, "after must name a layer"),
                                                 (0, 0, "at least 1")])
def test_bad_growth_is_refused(after, count, message):
  model_cfg, msa_cfg = _small()
  with pytest.raises(cfglib.ConfigError, match=message):
    grown_configs(model_cfg, msa_cfg, after=after, count=count)
