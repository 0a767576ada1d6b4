"""Losses: chunked LM cross-entropy, router auxiliary losses, recall, loss weights and every term
of the training objective against numpy oracles."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import config as cfglib
from msa_jax.config import AUX_LOSS_METHODS, MSAConfig
from msa_jax.data.batch import MemoryBatch, plain_prompt
from msa_jax.data.batch_builder import Sample
from msa_jax.model.model import MSAForCausalLM
from msa_jax.training import losses, targets
from msa_jax.training.objective import loss_and_metrics
from tests.msa_fixtures import make_batch

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


def test_stacked_label_sets_share_one_pass_and_match_the_oracle():
  hidden, kernel, labels = ce_batch(seed=2)
  sets = np.stack([labels, np.where(labels % 2 == 0, labels, -1), np.full_like(labels, -1)])
  total, count = jax.jit(functools.partial(losses.chunked_cross_entropy, chunk_size=8))(
      hidden, kernel, sets)
  assert total.shape == count.shape == (3,)
  for k in range(3):
    want_total, want_count = oracle_ce(hidden, kernel, sets[k])
    assert float(count[k]) == want_count
    np.testing.assert_allclose(float(total[k]), want_total, rtol=1e-5)
  mean = losses.mean_cross_entropy(hidden, kernel, sets, 8)
  np.testing.assert_allclose(np.asarray(mean)[:2], np.asarray(total)[:2] / np.asarray(count)[:2],
                             rtol=1e-6)
  assert float(mean[2]) == 0.0
  grad = jax.grad(lambda h: jnp.sum(losses.chunked_cross_entropy(h, kernel, sets, 8)[0]))(hidden)
  want = sum(jax.grad(dense_ce)(hidden, kernel, sets[k]) for k in range(3))
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize("label_sets", [(), (3,)])
def test_chunked_ce_never_builds_full_logits_forward_or_backward(label_sets):
  b, s, e, v, chunk = 2, 4096, 8, 1000, 128
  hidden = jnp.zeros((b, s, e), jnp.bfloat16)
  kernel = jnp.zeros((e, v), jnp.bfloat16)
  labels = jnp.zeros(label_sets + (b, s), jnp.int32)
  loss = lambda h, w: jnp.sum(losses.chunked_cross_entropy(h, w, labels, chunk)[0])
  value_and_grad = jax.value_and_grad(loss, argnums=(0, 1))
  largest = max(np.prod(shape, dtype=np.int64) for shape in
                _jaxpr_shapes(jax.make_jaxpr(value_and_grad)(hidden, kernel).jaxpr))
  assert largest == b * chunk * v  # one chunk's logits, never all chunks' (nor stacked residuals)
  text = jax.jit(value_and_grad).lower(hidden, kernel).as_text()
  assert f"{b}x{chunk}x{v}xf32" in text
  assert f"{b}x{s}x{v}x" not in text and f"{s // chunk}x{b}x{chunk}x{v}x" not in text


# --------------------------------------------------------------------------- total


def test_total_loss_weights():
  terms = {"lm": 2.0, "aux": 3.0, "answer": 4.0, "context_lm": 5.0, "prompt_dense": 6.0}
  cfg = MSAConfig(lm_loss_weight=1.0, aux_loss_weight=0.1, answer_loss_weight=0.5)
  weights = losses.LossWeights.of(cfg)
  assert weights == losses.LossWeights(lm=1.0, aux=0.1, answer=0.5)
  assert float(losses.total_loss(terms, weights)) == pytest.approx(4.3)
  warmup = losses.LossWeights.of(cfg, lm=0.1, aux=1.0, answer=None, context_lm=0.5)
  assert float(losses.total_loss(terms, warmup)) == pytest.approx(0.2 + 3.0 + 2.0 + 2.5)
  # a zero weight leaves its term out (it need not be computed); a nonzero one requires it
  assert float(losses.total_loss({"memory_lm": 7.0}, losses.LossWeights(
      lm=0.0, aux=0.0, memory_lm=2.0))) == pytest.approx(14.0)
  with pytest.raises(ValueError, match=r"\['memory_lm'\] have nonzero weights"):
    losses.total_loss(terms, losses.LossWeights(memory_lm=1.0))


def test_loss_weights_refuse_reconstruction_and_negatives():
  with pytest.raises(ValueError, match="rec_loss_weight 0.5: the official reconstruction labels"):
    losses.LossWeights.of(MSAConfig(rec_loss_weight=0.5))
  assert losses.LossWeights.of(MSAConfig(rec_loss_weight=0.0)).rec == 0.0
  with pytest.raises(ValueError, match=r"loss weights must be >= 0, got \{'context_lm': -1.0\}"):
    losses.LossWeights(context_lm=-1.0)


# --------------------------------------------------------------------------- targets


def test_memory_labels_stay_inside_each_document():
  memory = MemoryBatch(tokens=jnp.asarray([[11, 12, 13, 21, 22, 31, 0, 0]]),
                       segment_ids=jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]]),
                       positions=None, chunk_ids=None, chunk_doc=None, chunk_len=None)
  np.testing.assert_array_equal(targets.memory_labels(memory),
                                [[12, 13, -1, 22, -1, -1, -1, -1]])


# --------------------------------------------------------------------------- the objective

T, F = True, False
MAX_DOCS = 5


@pytest.fixture(scope="module")
def objective():
  """A tiny float32 model and two samples: one with injected context and an answer value, one
  with neither; four documents each, one positive, so the aux loss has negatives. With every term
  of the numpy oracle (`_oracle_terms`) and the router's document scores."""
  model_cfg, msa = cfglib.preset("tiny")
  model = MSAForCausalLM(model_cfg.replace(compute_dtype="float32"), msa)
  rng = np.random.default_rng(0)
  ids = lambda n: rng.integers(5, 250, n).tolist()
  samples = [
      Sample(documents=[ids(n) for n in (6, 3, 5, 4)], template_head=[1, 2, 3], question=ids(3),
             template_tail=[4], context=ids(6), context_route=[F, T, T, T, F, F],
             context_target=[F, T, T, T, F, F], answer=ids(5), answer_target=[T, F, T, T, T],
             answer_value=[F, F, T, T, F], positive_docs=[2]),
      Sample(documents=[ids(n) for n in (2, 7, 4, 1)], template_head=[1, 2, 3], question=ids(4),
             template_tail=[4], answer=ids(3), positive_docs=[0]),
  ]
  memory, prompt = make_batch(samples, msa, seq_len_mem=24, seq_len_prompt=24, max_docs=MAX_DOCS)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), prompt, memory)["params"])
  want, doc_scores = _oracle_terms(model, params, samples, memory, prompt)
  present = np.zeros((len(samples), MAX_DOCS), bool)
  doc_labels = np.zeros((len(samples), MAX_DOCS), np.int32)
  for b, s in enumerate(samples):
    present[b, :len(s.documents)] = True
    doc_labels[b, list(s.positive_docs)] = 1
  return dict(model=model, params=params, memory=memory, prompt=prompt, want=want,
              scores=doc_scores[..., :MAX_DOCS], present=present, doc_labels=doc_labels)


def _log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def _oracle_terms(model, params, samples, memory, prompt):
  """Every LM term from dense logits and the samples' own fields (not the batch's masks); the memory
  LM from the documents run alone as plain prompts (the memory stream attends within documents
  at document-local positions, so the backbone on a document alone gives the same logits)."""
  logits_of = jax.jit(lambda p, pr, m: model.apply({"params": p}, pr, m,
                                                    method=MSAForCausalLM.prompt_logits))
  logits, out = logits_of(params, prompt, memory)
  logp = _log_softmax(logits)
  pairs = {"lm": [], "answer": [], "context_lm": [], "prompt_dense": [], "memory_lm": []}
  for b, s in enumerate(samples):
    seq = [*s.template_head, *s.question, *s.template_tail, *s.context, *s.answer]
    answer_start, head = len(seq) - len(s.answer), len(s.template_head)
    context_start = answer_start - len(s.context)
    nll = lambda p: -logp[b, p, seq[p + 1]]
    target = list(s.answer_target) or [True] * len(s.answer)
    pairs["lm"] += [nll(answer_start + i - 1) for i, t in enumerate(target) if t]
    pairs["answer"] += [nll(answer_start + i - 1) for i, v in enumerate(s.answer_value) if v]
    pairs["context_lm"] += [nll(context_start + i - 1) for i, c in enumerate(s.context_target)
                            if c]
    pairs["prompt_dense"] += [nll(p - 1) for p in range(head, len(seq))]
  docs = [d for s in samples for d in s.documents]
  width = max(len(d) for d in docs)
  tokens = np.array([d + [0] * (width - len(d)) for d in docs])
  valid = np.array([[i < len(d) for i in range(width)] for d in docs], np.int32)
  doc_logp = _log_softmax(logits_of(params, plain_prompt(tokens, segment_ids=valid), None)[0])
  for j, doc in enumerate(docs):
    pairs["memory_lm"] += [-doc_logp[j, p, doc[p + 1]] for p in range(len(doc) - 1)]
  assert all(pairs.values())  # every term is exercised
  return {k: float(np.mean(v)) for k, v in pairs.items()}, np.asarray(out.doc_scores)


def _metrics(model, params, memory, prompt, **kw):
  return jax.jit(lambda p: loss_and_metrics(p, model, memory, prompt, ce_chunk_size=5, **kw))(
      params)


@pytest.mark.parametrize("weights", [
    losses.LossWeights(lm=1.0, aux=0.1, answer=0.7, memory_lm=0.5, context_lm=0.3,
                       prompt_dense=0.2),
    losses.LossWeights(lm=0.0, aux=0.0, memory_lm=1.0),  # the LM pre-phase over documents
])
def test_objective_terms_match_numpy_oracles(objective, weights):
  o = objective
  want = dict(o["want"], aux=oracle_aux(o["scores"], o["present"], o["doc_labels"],
                                        o["model"].msa.aux_loss_method))
  total, metrics = _metrics(o["model"], o["params"], o["memory"], o["prompt"], weights=weights)
  for name, value in want.items():
    np.testing.assert_allclose(float(metrics[f"{name}_loss"]), value, rtol=1e-5, err_msg=name)
  want_total = sum(w * want[name] for name, w in weights.active().items())
  np.testing.assert_allclose(float(total), want_total, rtol=1e-5)
  assert float(metrics["loss"]) == float(total)
  assert len({round(v, 4) for v in want.values()}) == len(want)  # the terms differ


def _metric_names(model, o, **kw):
  """The metrics' names, from an abstract evaluation (nothing is compiled)."""
  return set(jax.eval_shape(lambda p: loss_and_metrics(p, model, o["memory"], o["prompt"], **kw),
                            o["params"])[1])


def test_memory_lm_is_computed_only_when_weighted(objective):
  names = _metric_names(objective["model"], objective)
  assert "memory_lm_loss" not in names
  assert {"loss", "lm_loss", "aux_loss", "answer_loss", "context_lm_loss",
          "prompt_dense_loss"} <= names
  assert "memory_lm_loss" in _metric_names(objective["model"], objective,
                                           weights=losses.LossWeights(memory_lm=1.0))


def test_aux_loss_counts_only_router_layers_from_the_min_layer(objective):
  """tiny routes in layers 2 and 3; aux_loss_min_layer=3 (the official num_layers // 2 rule for
  a 6-layer model) leaves layer 3 alone, while recall still covers both."""
  o = objective
  model = o["model"].clone(msa=o["model"].msa.replace(aux_loss_min_layer=3))
  assert model.msa.router_layers == (2, 3) and model.msa.aux_layers == (3,)
  method = model.msa.aux_loss_method
  only_3 = oracle_aux(o["scores"][1:], o["present"], o["doc_labels"], method)
  both = oracle_aux(o["scores"], o["present"], o["doc_labels"], method)
  assert abs(only_3 - both) > 1e-3  # the filter is visible
  _, metrics = _metrics(model, o["params"], o["memory"], o["prompt"])
  np.testing.assert_allclose(float(metrics["aux_loss"]), only_3, rtol=1e-5)
  assert {"recall@1/layer2", "recall@1/layer3"} <= set(metrics)
  beyond = model.clone(msa=model.msa.replace(aux_loss_min_layer=4))
  with pytest.raises(ValueError, match="aux_loss_min_layer 4 leaves the aux loss none"):
    _metric_names(beyond, o)
  assert "aux_loss" not in _metric_names(beyond, o, weights=losses.LossWeights(aux=0.0))
