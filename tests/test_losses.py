"""Losses: chunked LM cross-entropy, router auxiliary losses and recall against numpy oracles."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax.config import AUX_LOSS_METHODS, MSAConfig
from msa_jax.training import losses

# --------------------------------------------------------------------------- numpy oracles


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _oracle_pair(s, y, method, tau, gamma, bias):
  """Loss of one (layer, sample) over its present docs, float64, written from the formulas."""
  if method == "BCE":
    sign = np.where(y > 0, 1.0, -1.0)
    return -np.mean(_log_sigmoid((s + bias) * sign))
  z = s / tau
  pos = np.flatnonzero(y > 0)
  neg = np.flatnonzero(y == 0)
  total = 0.0
  for i in pos:
    if method in ("INFONCE", "INFONCE_FOCAL"):
      m = z.max()
      log_p = z[i] - m - np.log(np.sum(np.exp(z - m)))
    else:
      m = max(z[i], z[neg].max()) if len(neg) else z[i]
      log_p = z[i] - m - np.log(np.exp(z[i] - m) + np.sum(np.exp(z[neg] - m)))
    weight = (1.0 - np.exp(log_p)) ** gamma if method.endswith("FOCAL") else 1.0
    total -= weight * log_p
  return total / len(pos)


def oracle_aux(scores, present, labels, method, tau=0.1, gamma=2.0, bias=-20.0):
  scores = np.asarray(scores, np.float64)
  values = []
  for layer in range(scores.shape[0]):
    for row in range(scores.shape[1]):
      docs = np.flatnonzero(present[row])
      y = labels[row, docs]
      if len(docs) == 0 or not np.any(y > 0):
        continue
      values.append(_oracle_pair(scores[layer, row, docs], y, method, tau, gamma, bias))
  return float(np.mean(values)) if values else 0.0


def oracle_recall(scores, present, labels, n):
  out = []
  for layer in range(scores.shape[0]):
    values = []
    for row in range(scores.shape[1]):
      docs = np.flatnonzero(present[row])
      num_pos = int(np.sum(labels[row, docs] > 0))
      if num_pos == 0:
        continue
      ranked = docs[np.argsort(-scores[layer, row, docs])]
      hits = int(np.sum(labels[row, ranked[:n]] > 0))
      values.append(hits / min(num_pos, n))
    out.append(np.mean(values) if values else 0.0)
  return np.array(out)


def official_recall(scores, present, labels, n):
  """The official definition: n clipped to the doc count, hits / min(#pos, 10), layers pooled."""
  values = []
  for layer in range(scores.shape[0]):
    for row in range(scores.shape[1]):
      docs = np.flatnonzero(present[row])
      num_pos = int(np.sum(labels[row, docs] > 0))
      if num_pos == 0:
        continue
      ranked = docs[np.argsort(-scores[layer, row, docs])]
      hits = int(np.sum(labels[row, ranked[:min(n, len(docs))]] > 0))
      values.append(hits / min(num_pos, 10))
  return np.mean(values)


def oracle_ce(hidden, kernel, labels):
  logits = np.einsum("bse,ev->bsv", np.asarray(hidden, np.float64), np.asarray(kernel, np.float64))
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  b, s = np.nonzero(labels >= 0)
  return -np.sum(logp[b, s, labels[b, s]]), float(len(b))


# --------------------------------------------------------------------------- fixtures


def router_batch(seed=0, layers=3, docs=12):
  """Rows: 1 positive; several positives; no positive; all present positive; no present doc;
  a ragged non-prefix mask. Absent docs carry -1e30 / -inf and stray positive labels."""
  rng = np.random.default_rng(seed)
  present = np.zeros((6, docs), bool)
  present[0, :7] = True
  present[1, :docs] = True
  present[2, :5] = True
  present[3, :4] = True
  present[5] = rng.random(docs) < 0.6
  present[5, [0, 3]] = True
  labels = np.zeros((6, docs), np.int32)
  labels[0, 2] = 1
  labels[1, [1, 4, 6, 9, 10]] = 1
  labels[3, :4] = 1
  labels[5, [0, 3]] = 1
  labels[~present] = rng.integers(0, 2, size=int(np.sum(~present)))
  scores = rng.uniform(-1, 1, (layers, 6, docs)).astype(np.float32)
  absent_fill = np.where(rng.random((layers, 6, docs)) < 0.5, -1e30, -np.inf)
  scores = np.where(present[None], scores, absent_fill).astype(np.float32)
  return scores, present, labels


def run_aux(cfg, scores, present, labels, bias=None):
  fn = jax.jit(functools.partial(losses.aux_loss, cfg=cfg))
  return float(fn(jnp.asarray(scores), jnp.asarray(present), jnp.asarray(labels), bce_bias=bias))


# --------------------------------------------------------------------------- aux loss


@pytest.mark.parametrize("method", AUX_LOSS_METHODS)
@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_aux_loss_matches_oracle(method, gamma):
  scores, present, labels = router_batch()
  cfg = MSAConfig(aux_loss_method=method, focal_gamma=gamma)
  bias = -0.3 if method == "BCE" else None
  want = oracle_aux(scores, present, labels, method, 0.1, gamma, -0.3)
  np.testing.assert_allclose(run_aux(cfg, scores, present, labels, bias), want, rtol=1e-5)


def test_bce_bias_defaults_to_config_init():
  scores, present, labels = router_batch(seed=1)
  cfg = MSAConfig(aux_loss_method="BCE", bce_bias_init=-2.0)
  want = oracle_aux(scores, present, labels, "BCE", bias=-2.0)
  np.testing.assert_allclose(run_aux(cfg, scores, present, labels), want, rtol=1e-5)


def test_decoupled_is_eq5_and_differs_from_infonce_with_several_positives():
  s = np.array([[[0.9, 0.8, 0.1, -0.2]]], np.float32)
  present, labels = np.ones((1, 4), bool), np.array([[1, 1, 0, 0]])
  z = s[0, 0].astype(np.float64) / 0.1
  eq5 = -np.mean([np.log(np.exp(z[i]) / (np.exp(z[i]) + np.exp(z[2]) + np.exp(z[3])))
                  for i in (0, 1)])
  got = run_aux(MSAConfig(aux_loss_method="INFONCE_DECOUPLE"), s, present, labels)
  np.testing.assert_allclose(got, eq5, rtol=1e-5)
  assert abs(run_aux(MSAConfig(aux_loss_method="INFONCE"), s, present, labels) - got) > 0.1


@pytest.mark.parametrize("method", AUX_LOSS_METHODS)
def test_aux_gradients_finite_zero_on_absent_and_match_finite_differences(method):
  scores, present, labels = router_batch(seed=2)
  cfg = MSAConfig(aux_loss_method=method, focal_gamma=0.5)
  loss = lambda s, b: losses.aux_loss(s, jnp.asarray(present), jnp.asarray(labels), cfg, b)
  g_scores, g_bias = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(scores), jnp.float32(-0.3))
  g_scores = np.asarray(g_scores)
  assert np.all(np.isfinite(g_scores)) and np.isfinite(g_bias)
  assert np.all(g_scores[:, ~present] == 0)
  base = np.where(present[None], scores, 0).astype(np.float64)
  eps = 1e-6
  for idx in zip(*np.nonzero(np.broadcast_to(present, scores.shape))):
    hi, lo = base.copy(), base.copy()
    hi[idx] += eps
    lo[idx] -= eps
    fd = (oracle_aux(hi, present, labels, method, 0.1, 0.5, -0.3)
          - oracle_aux(lo, present, labels, method, 0.1, 0.5, -0.3)) / (2 * eps)
    np.testing.assert_allclose(g_scores[idx], fd, rtol=2e-3, atol=1e-5, err_msg=str(idx))
  if method == "BCE":
    fd = (oracle_aux(base, present, labels, "BCE", bias=-0.3 + eps)
          - oracle_aux(base, present, labels, "BCE", bias=-0.3 - eps)) / (2 * eps)
    np.testing.assert_allclose(g_bias, fd, rtol=1e-4)
  else:
    assert g_bias == 0


@pytest.mark.parametrize("method", AUX_LOSS_METHODS)
def test_no_valid_pair_gives_zero_loss_and_gradient(method):
  scores, present, _ = router_batch(seed=3)
  labels = np.zeros_like(present, np.int32)
  labels[~present] = 1  # positives on absent docs only: still no valid pair
  cfg = MSAConfig(aux_loss_method=method)
  assert run_aux(cfg, scores, present, labels) == 0.0
  grad = jax.grad(functools.partial(losses.aux_loss, cfg=cfg))(
      jnp.asarray(scores), jnp.asarray(present), jnp.asarray(labels))
  assert np.all(np.asarray(grad) == 0)


def test_temperature_is_clamped_like_the_official_code():
  assert losses.clamped_temperature(MSAConfig(temperature=1e-6)) == 0.001
  assert losses.clamped_temperature(MSAConfig(temperature=7.0)) == 0.5
  assert losses.clamped_temperature(MSAConfig(temperature=0.07)) == 0.07
  scores, present, labels = router_batch(seed=4)
  for method in ("INFONCE", "INFONCE_DECOUPLE", "INFONCE_DECOUPLE_FOCAL", "INFONCE_FOCAL"):
    for temperature, clamped in ((1e-6, 0.001), (7.0, 0.5)):
      got = run_aux(MSAConfig(aux_loss_method=method, temperature=temperature), scores, present,
                    labels)
      np.testing.assert_allclose(got, oracle_aux(scores, present, labels, method, clamped),
                                 rtol=1e-5, err_msg=f"{method} τ={temperature}")


def test_smallest_temperature_keeps_gradients_finite():
  scores, present, labels = router_batch(seed=5)
  for method in ("INFONCE", "INFONCE_DECOUPLE", "INFONCE_DECOUPLE_FOCAL", "INFONCE_FOCAL"):
    cfg = MSAConfig(aux_loss_method=method, temperature=0.001, focal_gamma=0.5)
    grad = jax.grad(functools.partial(losses.aux_loss, cfg=cfg))(
        jnp.asarray(scores), jnp.asarray(present), jnp.asarray(labels))
    assert np.all(np.isfinite(np.asarray(grad))), method


# --------------------------------------------------------------------------- recall


def test_router_recall_matches_oracle_and_official_at_10():
  scores, present, labels = router_batch(seed=6, layers=4, docs=12)
  rng = np.random.default_rng(7)
  labels[5, np.flatnonzero(present[5])[:3]] = 1
  got = jax.jit(losses.router_recall)(jnp.asarray(scores), jnp.asarray(present),
                                      jnp.asarray(labels))
  assert sorted(got) == ["recall@1", "recall@10", "recall@16", "recall@5"]
  for n in (1, 5, 10, 16):
    assert got[f"recall@{n}"].shape == (4,)
    np.testing.assert_allclose(got[f"recall@{n}"], oracle_recall(scores, present, labels, n),
                               rtol=1e-6, err_msg=f"n={n}")
  np.testing.assert_allclose(np.mean(got["recall@10"]),
                             official_recall(scores, present, labels, 10), rtol=1e-6)
  perfect = np.where(labels > 0, 1.0, 0.0) + rng.uniform(0, 0.5, labels.shape)
  perfect = np.broadcast_to(perfect, scores.shape).astype(np.float32)
  best = losses.router_recall(jnp.asarray(perfect), jnp.asarray(present), jnp.asarray(labels),
                              ns=(1, 3))
  np.testing.assert_array_equal(best["recall@1"], 1.0)
  np.testing.assert_array_equal(best["recall@3"], 1.0)


# --------------------------------------------------------------------------- LM cross-entropy


def ce_batch(seq=37, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(2, seq, 16)).astype(dtype)
  kernel = (rng.normal(size=(16, 50)) * 0.5).astype(dtype)
  labels = rng.integers(0, 50, size=(2, seq)).astype(np.int32)
  labels[rng.random((2, seq)) < 0.3] = -1
  return hidden, kernel, labels


def dense_ce(hidden, kernel, labels):
  logp = jax.nn.log_softmax(jnp.einsum("bse,ev->bsv", hidden, kernel), axis=-1)
  valid = labels >= 0
  picked = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  return -jnp.sum(jnp.where(valid, picked, 0.0))


@pytest.mark.parametrize("seq,chunk", [(37, 8), (37, 1), (37, 37), (37, 64), (40, 8)])
def test_chunked_ce_matches_dense_value_and_gradient(seq, chunk):
  hidden, kernel, labels = ce_batch(seq)
  fn = jax.jit(functools.partial(losses.chunked_cross_entropy, chunk_size=chunk))
  total, count = fn(hidden, kernel, labels)
  want_total, want_count = oracle_ce(hidden, kernel, labels)
  assert total.dtype == jnp.float32 and float(count) == want_count
  np.testing.assert_allclose(float(total), want_total, rtol=1e-5)
  mean = losses.mean_cross_entropy(hidden, kernel, labels, chunk)
  np.testing.assert_allclose(float(mean), want_total / want_count, rtol=1e-5)
  grad = jax.jit(jax.grad(lambda h, w: fn(h, w, labels)[0], argnums=(0, 1)))(hidden, kernel)
  want = jax.grad(dense_ce, argnums=(0, 1))(hidden, kernel, labels)
  for g, w in zip(grad, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_chunked_ce_bf16_inputs_accumulate_in_f32():
  hidden, kernel, labels = ce_batch(seed=1)
  hidden, kernel = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16)
  total, count = losses.chunked_cross_entropy(hidden, kernel, labels, 8)
  want_total, want_count = oracle_ce(np.asarray(hidden.astype(jnp.float32)),
                                     np.asarray(kernel.astype(jnp.float32)), labels)
  assert total.dtype == jnp.float32 and float(count) == want_count
  np.testing.assert_allclose(float(total), want_total, rtol=1e-5)


def test_all_ignored_labels_give_zero():
  hidden, kernel, labels = ce_batch()
  labels[:] = -1
  total, count = losses.chunked_cross_entropy(hidden, kernel, labels, 8)
  assert float(total) == 0.0 and float(count) == 0.0
  assert float(losses.mean_cross_entropy(hidden, kernel, labels, 8)) == 0.0


def _jaxpr_shapes(jaxpr):
  """Every array shape that a jaxpr, or any jaxpr nested in its equations, produces."""
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield tuple(var.aval.shape)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _jaxpr_shapes(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _jaxpr_shapes(sub)


def test_chunked_ce_never_builds_full_logits_forward_or_backward():
  b, s, e, v, chunk = 2, 4096, 8, 1000, 128
  hidden = jnp.zeros((b, s, e), jnp.bfloat16)
  kernel = jnp.zeros((e, v), jnp.bfloat16)
  labels = jnp.zeros((b, s), jnp.int32)
  loss = lambda h, w: losses.chunked_cross_entropy(h, w, labels, chunk)[0]
  value_and_grad = jax.value_and_grad(loss, argnums=(0, 1))
  largest = max(np.prod(shape, dtype=np.int64) for shape in
                _jaxpr_shapes(jax.make_jaxpr(value_and_grad)(hidden, kernel).jaxpr))
  assert largest == b * chunk * v  # one chunk's logits, never all chunks' (nor stacked residuals)
  text = jax.jit(value_and_grad).lower(hidden, kernel).as_text()
  assert f"{b}x{chunk}x{v}xf32" in text
  assert f"{b}x{s}x{v}x" not in text and f"{s // chunk}x{b}x{chunk}x{v}x" not in text


# --------------------------------------------------------------------------- total


def test_total_loss_weights():
  cfg = MSAConfig(lm_loss_weight=1.0, aux_loss_weight=0.1, answer_loss_weight=0.5)
  assert float(losses.total_loss(2.0, 3.0, cfg=cfg)) == pytest.approx(2.3)
  assert float(losses.total_loss(2.0, 3.0, 4.0, cfg=cfg)) == pytest.approx(4.3)
  warmup = MSAConfig(lm_loss_weight=0.1, aux_loss_weight=1.0)
  assert float(losses.total_loss(2.0, 3.0, cfg=warmup)) == pytest.approx(3.2)
