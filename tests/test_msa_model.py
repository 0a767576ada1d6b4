"""MSA model invariants: encode+prefill == training forward, order/padding invariance, empty memory ==
Qwen3 (and transformers), gradient routing, no recompilation per bucket."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import msa_jax
from msa_jax import config as cfglib
from msa_jax.data.batch import plain_prompt
from msa_jax.data.batch_builder import Sample
from msa_jax.model import entry_points
from msa_jax.model.model import MSAForCausalLM
from msa_jax.training.losses import LossWeights
from msa_jax.training.objective import loss_and_metrics
from tests.msa_fixtures import make_batch, random_samples

DOCS = [[5, 9, 3, 7, 2], [12, 4, 6]]
TEMPLATE = [1, 2, 3]


def _setup(seed=0, **msa_overrides):
  model_cfg, msa_cfg = cfglib.preset("tiny")
  model_cfg = model_cfg.replace(compute_dtype="float32")
  msa_cfg = msa_cfg.replace(**msa_overrides)
  samples = random_samples(np.random.default_rng(seed), DOCS)
  memory, prompt = make_batch(samples, msa_cfg)
  model = MSAForCausalLM(model_cfg, msa_cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), prompt, memory)["params"])
  return model, params, samples, memory, prompt


def _valid(prompt):
  return np.asarray(prompt.segment_ids).astype(bool)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("overrides", [dict(score_mode="cosine"), dict(score_mode="scaled_dot"),
                                       dict(decouple_router=False, head_reduce="max",
                                            query_reduce="mean", chunk_reduce="mean")])
def test_encode_then_prefill_reproduces_training_forward(scan, overrides):
  model, params, _, memory, prompt = _setup(**overrides)
  if scan:
    from msa_jax.model.param_layout import stack_layers
    model = model.clone(config=model.config.replace(scan_layers=True))
    params = stack_layers(params, model.config.num_layers, model.msa.router_layers)
  train = jax.jit(lambda p, m, pr: model.apply({"params": p}, pr, m,
                                               method=MSAForCausalLM.prompt_logits))
  logits, out = train(params, memory, prompt)
  encoded = jax.jit(entry_points.encode_memory, static_argnums=0)(model, params, memory, TEMPLATE)
  p_logits, p_out = jax.jit(functools.partial(entry_points.prefill, document_scores=True),
                            static_argnums=0)(model, params, prompt, encoded.view)
  valid = _valid(prompt)
  err = float(np.abs(np.asarray(p_logits) - np.asarray(logits))[valid].max())
  print(f"encode+prefill vs training forward ({overrides}, scan={scan}): max |Δlogits| = {err:.2e}")
  assert err < 1e-5
  cols = out.doc_scores.shape[-1]
  selected = lambda o: np.asarray(jax.vmap(lambda s: s.mask(cols))(o.selection))  # [L_r, B, C]
  np.testing.assert_array_equal(selected(p_out), selected(out))
  np.testing.assert_allclose(p_out.doc_scores, out.doc_scores, atol=1e-6)
  np.testing.assert_array_equal(p_out.doc_present, out.doc_present)
  # and in the same order, with the same scores (best first)
  np.testing.assert_array_equal(p_out.selection.doc_index, out.selection.doc_index)
  np.testing.assert_allclose(p_out.selection.scores, out.selection.scores, atol=1e-6)
  k_eff = np.minimum(model.msa.top_k_docs, [len(d) for d in DOCS])
  np.testing.assert_array_equal(selected(out).sum(-1), np.broadcast_to(k_eff, (2, 2)))
  # the template head's KV equals the prompt stream's KV at those positions, in every layer
  kv = jax.jit(lambda p, pr: model.apply({"params": p}, pr, method=MSAForCausalLM.prefill))(
      params, prompt).kv
  for (tk, tv), (pk, pv, _, _) in zip(encoded.template_kv, kv):
    np.testing.assert_allclose(tk[0], pk[0, :3], atol=1e-6)
    np.testing.assert_allclose(tv[0], pv[0, :3], atol=1e-6)


def _hidden(forward, model, params, samples, **sizes):
  memory, prompt = make_batch(samples, model.msa, **sizes)
  out = forward(params, memory, prompt)
  return np.asarray(out.hidden), out, prompt


def test_prompt_is_invariant_to_document_order_and_padding():
  model, params, samples, _, _ = _setup(seed=1)
  # one jitted forward: the shuffled batch has the base batch's shapes, so it reuses its executable
  forward = jax.jit(lambda p, m, pr: model.apply({"params": p}, pr, m))
  hidden = functools.partial(_hidden, forward)
  base, out, prompt = hidden(model, params, samples)
  valid = _valid(prompt)
  rng = np.random.default_rng(7)
  permuted = []
  for s in samples:
    order = rng.permutation(len(s.documents))
    where = {old: new for new, old in enumerate(order)}
    permuted.append(dataclasses.replace(s, documents=[s.documents[i] for i in order],
                                        positive_docs=sorted(where[i] for i in s.positive_docs)))
  shuffled, out_p, _ = hidden(model, params, permuted)
  np.testing.assert_allclose(shuffled[valid], base[valid], atol=1e-5)
  for b, s in enumerate(permuted):  # the same documents are selected, wherever they sit
    picked = lambda o, samp: {tuple(samp.documents[d]) for d in
                              np.asarray(o.selection.doc_index)[-1, b]
                              [np.asarray(o.selection.valid)[-1, b]]}
    assert picked(out_p, s) == picked(out, samples[b])
  padded, _, _ = hidden(model, params, samples, seq_len_mem=80, seq_len_prompt=24, max_docs=9)
  np.testing.assert_allclose(padded[:, :16][valid], base[valid], atol=1e-5)
  extra_row = random_samples(np.random.default_rng(9), [[6, 6]])
  more_rows, _, _ = hidden(model, params, samples + extra_row)
  np.testing.assert_allclose(more_rows[:2][valid], base[valid], atol=1e-5)


def test_empty_memory_equals_backbone_and_transformers(tmp_path):
  pytest.importorskip("torch")
  from tests.hf_fixtures import make_qwen3, padded_batch, torch_logits
  hf_model = make_qwen3(str(tmp_path), seed=4)
  loaded = msa_jax.load(str(tmp_path), compute_dtype="float32")
  tokens, mask = padded_batch(loaded.model_config.vocab_size, seed=3)
  prompt = plain_prompt(tokens, segment_ids=mask)
  everywhere = jnp.asarray(mask, bool)  # every token routes and sees memory: there is none
  prompt = prompt.replace(route_mask=everywhere, sees_memory=everywhere)
  empty = [Sample(documents=[], template_head=[1], question=[2], answer=[],
                  positive_docs=[])] * tokens.shape[0]
  memory, _ = make_batch(empty, loaded.msa_config, seq_len_mem=16, seq_len_prompt=4, max_docs=2)
  model = loaded.model
  logits, out = jax.jit(lambda p, m, pr: model.apply({"params": p}, pr, m,
                                                     method=MSAForCausalLM.prompt_logits))(
      loaded.params, memory, prompt)
  assert not np.asarray(out.selection.valid).any()
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[valid],
                             np.asarray(loaded.logits(tokens, segment_ids=mask))[valid], atol=1e-6)
  err = float(np.abs(np.asarray(logits) - torch_logits(hf_model, tokens, mask))[valid].max())
  print(f"empty memory vs transformers Qwen3: max |Δlogits| = {err:.2e}")
  assert err < 1e-4


def _is_router(path):
  return any(getattr(k, "key", None) in ("router_q", "router_k") for k in path)


def test_router_learns_only_from_aux_loss_and_backbone_from_lm_loss():
  model, params, _, memory, prompt = _setup(seed=2)
  grad = lambda lm_w, aux_w: jax.jit(jax.grad(lambda p: loss_and_metrics(
      p, model, memory, prompt, weights=LossWeights(lm=lm_w, aux=aux_w))[0]))(params)
  g_lm, g_aux, g_all = grad(1.0, 0.0), grad(0.0, 1.0), grad(1.0, 0.1)
  for g in (g_lm, g_aux, g_all):
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))
  lm_leaves = jax.tree_util.tree_leaves_with_path(g_lm)
  aux_leaves = jax.tree_util.tree_leaves_with_path(g_aux)
  router_lm = [np.abs(np.asarray(x)).max() for p, x in lm_leaves if _is_router(p)]
  router_aux = [np.abs(np.asarray(x)).max() for p, x in aux_leaves if _is_router(p)]
  assert len(router_lm) == 4 and max(router_lm) == 0.0  # selection carries no gradient
  assert min(router_aux) > 0.0
  backbone_lm = [np.abs(np.asarray(x)).max() for p, x in lm_leaves if not _is_router(p)]
  assert min(backbone_lm) > 0.0
  _, metrics = jax.jit(lambda p: loss_and_metrics(p, model, memory, prompt))(params)
  assert {"lm_loss", "aux_loss", "loss", "recall@1/layer2", "recall@5/layer3"} <= set(metrics)


def test_same_bucket_does_not_recompile():
  model, params, _, _, _ = _setup(seed=3)
  traces = []

  @jax.jit
  def step(p, memory, prompt):
    traces.append(1)
    return loss_and_metrics(p, model, memory, prompt)[0]

  for seed in (11, 12, 13):
    samples = random_samples(np.random.default_rng(seed), [[3, 8], [10, 2, 2, 5]])
    memory, prompt = make_batch(samples, model.msa)
    assert np.isfinite(float(step(params, memory, prompt)))
  assert len(traces) == 1
