"""Growth (msa_jax/training/grow.py): a deeper or wider model computes what the original does; the
new weights are random but for the zeroed write-backs, gradients reach all of them, and the router
layers move with their weights."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

import msa_jax
from msa_jax import config as cfglib
from msa_jax.model.model import MSAForCausalLM
from msa_jax.training.grow import grow_depth, grow_width, grown_configs, widened_config
from msa_jax.model.param_layout import unstack_layers
from tests.binary_runner import ROOT, run_python
from tests.msa_fixtures import make_batch, random_samples

DOCS = [[9, 3, 6, 11], [5, 12]]  # document lengths of two samples


def _small(**msa):
  model_cfg, msa_cfg = cfglib.preset("tiny")
  return model_cfg.replace(compute_dtype="float32"), msa_cfg.replace(**msa)


def _forward(model_cfg, msa_cfg, params, memory, prompt):
  model = MSAForCausalLM(model_cfg, msa_cfg)
  return jax.jit(lambda p: model.apply({"params": p}, prompt, memory,
                                       method=MSAForCausalLM.prompt_logits))(params)


def _random_model(model_cfg, msa_cfg):
  """A random model (norm scales random too, so an identity that only holds for unit norms would
  fail), a batch, and its forward outputs."""
  memory, prompt = make_batch(random_samples(np.random.default_rng(0), DOCS), msa_cfg)
  model = MSAForCausalLM(model_cfg, msa_cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(1), prompt, memory)["params"])
  params = jax.tree.map(lambda x: x * (1.0 + 0.3 * np.random.default_rng(2).standard_normal(
      x.shape).astype(x.dtype)) if x.ndim == 1 else x, params)
  return model_cfg, msa_cfg, params, memory, prompt, _forward(model_cfg, msa_cfg, params, memory,
                                                              prompt)


@pytest.fixture(scope="module")
def original():
  return _random_model(*_small())


def _assert_same_outputs(grown_outputs, outputs, prompt, relative=False):
  """Same logits, selections, document scores and final-normed states (a wider model's states hold
  the old ones in the old dimensions and zeros in the new), to 1e-5: absolute, or with `relative`
  times each array's largest magnitude."""
  (g_logits, g_out), (logits, out) = grown_outputs, outputs
  e = out.hidden.shape[-1]
  for name in ("hidden", "memory_hidden"):
    np.testing.assert_array_equal(np.asarray(getattr(g_out, name))[..., e:], 0.0)
  g_out = g_out.replace(hidden=g_out.hidden[..., :e], memory_hidden=g_out.memory_hidden[..., :e])
  valid = np.asarray(prompt.segment_ids).astype(bool)
  pairs = [(np.asarray(g_logits)[valid], np.asarray(logits)[valid])] + [
      (np.asarray(b, np.float32), np.asarray(a, np.float32))
      for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(g_out))]
  for actual, desired in pairs:
    finite = np.abs(desired[np.isfinite(desired)])  # absent documents score -inf
    scale = float(finite.max(initial=0.0)) if relative else 1.0
    np.testing.assert_allclose(actual, desired, atol=1e-5 * scale)


@pytest.mark.parametrize("after,count", [(-1, 1), (1, 2)])  # (1, 2): right before a router layer
def test_grown_model_computes_the_same_logits_and_router_scores(original, after, count):
  model_cfg, msa_cfg, params, memory, prompt, outputs = original
  grown, g_model, g_msa = grow_depth(params, model_cfg, msa_cfg, after=after, count=count, seed=3)
  assert g_model.num_layers == model_cfg.num_layers + count
  assert sorted(k for k in grown if k.startswith("layers_")) == sorted(
      f"layers_{i}" for i in range(g_model.num_layers))
  _assert_same_outputs(_forward(g_model, g_msa, grown, memory, prompt), outputs, prompt)
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


# Twice the hidden size, 1.5x the MLP, twice the heads; the head max as well as the mean (new
# router heads copy old ones, which neither reduction may notice).
@pytest.mark.parametrize("hidden,intermediate,heads,head_reduce",
                         [(128, 192, 8, "mean"), (96, 128, 4, "max"), (64, 128, 8, "max")])
def test_widened_model_computes_the_same_logits_and_router_scores(hidden, intermediate, heads,
                                                                  head_reduce):
  model_cfg, msa_cfg = _small(head_reduce=head_reduce)
  # The norms' epsilon is the one inexact part (it is added to a mean square over more dimensions):
  # 1e-6 against our trained models' residual scale (embeddings of std 1) is below the tolerance;
  # against the preset's 0.02-std embeddings (mean square 4e-4) it would move logits by ~1e-3.
  model_cfg, msa_cfg, params, memory, prompt, outputs = _random_model(
      model_cfg.replace(embedding_init_std=1.0), msa_cfg)
  grown, wide = grow_width(params, model_cfg, msa_cfg, hidden_size=hidden,
                           intermediate_size=intermediate, num_heads=heads, seed=3)
  assert (wide.hidden_size, wide.intermediate_size, wide.num_heads, wide.num_kv_heads) == (
      hidden, intermediate, heads, heads // 2)
  _assert_same_outputs(_forward(wide, msa_cfg, grown, memory, prompt), outputs, prompt)


def test_gradients_reach_every_new_weight():
  """Nothing new is dead. From the first step every zero-started write-back and the new embedding
  columns get gradients (the random readers of the new dimensions carry them back); what reads the
  still-zero new dimensions, or feeds a zero-started write-back, gets them from the second step."""
  model_cfg, msa_cfg = _small()
  model_cfg, msa_cfg, params, memory, prompt, _ = _random_model(
      model_cfg.replace(embedding_init_std=1.0), msa_cfg)
  e, inter = model_cfg.hidden_size, model_cfg.intermediate_size
  h, kv = model_cfg.num_heads, model_cfg.num_kv_heads
  grown, wide = grow_width(params, model_cfg, msa_cfg, hidden_size=2 * e,
                           intermediate_size=2 * inter, num_heads=2 * h, seed=3)
  model = MSAForCausalLM(wide, msa_cfg)
  logits, _ = model.apply({"params": grown}, prompt, memory, method=MSAForCausalLM.prompt_logits)
  readout = np.random.default_rng(4).standard_normal(logits.shape).astype(np.float32)

  def loss(p):
    out, _ = model.apply({"params": p}, prompt, memory, method=MSAForCausalLM.prompt_logits)
    return (out * readout).sum()

  grad = jax.jit(jax.grad(loss))
  first = grad(grown)
  second = grad(jax.tree.map(lambda p, g: p - 1e-2 * g, grown, first))
  layer = lambda i, block, proj: (f"layers_{i}", block, proj, "kernel")
  from_first = [(("embed_tokens", "embedding"), np.s_[:, e:])]
  from_second = [(("lm_head",), np.s_[e:])]
  for i in range(wide.num_layers):
    from_first += [(layer(i, "attn", "o_proj"), np.s_[:, :, e:]),
                   (layer(i, "attn", "o_proj"), np.s_[h:]),
                   (layer(i, "mlp", "down_proj"), np.s_[:, e:]),
                   (layer(i, "mlp", "down_proj"), np.s_[inter:])]
    from_second += [(layer(i, "attn", proj), where)
                    for proj, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv))
                    for where in (np.s_[e:], np.s_[:, heads:])]
    from_second += [(layer(i, "mlp", proj), where) for proj in ("gate_proj", "up_proj")
                    for where in (np.s_[e:], np.s_[:, inter:])]

  def part(tree, path, where):
    for key in path:
      tree = tree[key]
    return np.abs(np.asarray(tree)[where]).max()

  for path, where in from_first:
    assert part(first, path, where) > 0, (path, where)
  for path, where in from_first + from_second:
    assert part(second, path, where) > 0, (path, where)
  # The write-backs start at zero where they are new and hold the old weights elsewhere.
  o = grown["layers_0"]["attn"]["o_proj"]["kernel"]
  assert not np.any(o[:, :, e:]) and not np.any(o[h:])
  np.testing.assert_array_equal(o[:h, :, :e], params["layers_0"]["attn"]["o_proj"]["kernel"])


@pytest.mark.parametrize("change,message", [
    (dict(hidden_size=32), "cannot shrink"), (dict(intermediate_size=64), "cannot shrink"),
    (dict(num_heads=6), "multiple of the model's 4"),
])
def test_bad_widening_is_refused(change, message):
  model_cfg, _ = _small()
  sizes = dict(hidden_size=128, intermediate_size=256, num_heads=8) | change
  with pytest.raises(cfglib.ConfigError, match=message):
    widened_config(model_cfg, **sizes)
  with pytest.raises(cfglib.ConfigError, match="tied embeddings"):
    widened_config(model_cfg.replace(tie_word_embeddings=True), hidden_size=128,
                   intermediate_size=256, num_heads=8)


def test_grow_model_tool_widens_and_deepens_the_shipped_model(tmp_path):
  """tools/grow_model.py on models/tiny_msa: the written checkpoint loads, has the asked shape, and
  answers a batch as the shipped model does; asking for nothing is refused."""
  shipped = os.path.join(ROOT, "models", "tiny_msa")
  out = tmp_path / "grown"
  result = run_python([os.path.join(ROOT, "tools", "grow_model.py"), f"--model={shipped}",
                       "--hidden_size=384", "--intermediate_size=1024", "--num_heads=16",
                       "--after=2", "--new_layers=1", f"--output={out}"], cwd=ROOT)
  assert result.returncode == 0, result.stderr
  assert "7 layers of 384 (16/8 heads, MLP 1024), router layers [4, 5, 6]" in result.stdout
  small, grown = msa_jax.load(shipped, scan_layers=False), msa_jax.load(str(out), scan_layers=False)
  memory, prompt = make_batch(random_samples(np.random.default_rng(5), DOCS), small.msa_config)
  outputs = [_forward(m.model_config, m.msa_config, unstack_layers(m.params), memory, prompt)
             for m in (small, grown)]
  # The trained model's logits reach ~50 and its states ~5, where float32 sums in another order
  # (over 384 hidden units instead of 256) differ by ~1e-6 of the scale (4e-5 on the logits with
  # the norms' epsilon at 0): the bound is relative to each array's scale.
  _assert_same_outputs(outputs[1], outputs[0], prompt, relative=True)
  refused = run_python([os.path.join(ROOT, "tools", "grow_model.py"), f"--model={shipped}",
                        f"--output={tmp_path / 'none'}"], cwd=ROOT)
  assert refused.returncode != 0 and "nothing to grow" in refused.stderr
  assert not (tmp_path / "none").exists()
