"""The generation engine against independent truths: the training forward (teacher forcing), a fresh
prefill of the longer prompt (cached decode), each request alone (batching and padding), a numpy
nucleus oracle, and clear errors for bad input. Tiny random float32 MSA model, one memory row."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax import config as cfglib
from msa_jax.data.batch import plain_prompt
from msa_jax.data.batch_builder import Sample, build_batch
from msa_jax.inference import sampling
from msa_jax.inference.engine import Engine, EngineError, _routing
from msa_jax.inference.requests import Request, SamplingConfig
from msa_jax.memory.bank_view import open_view
from msa_jax.model import entry_points, router
from msa_jax.kernels.segment_attention import blockwise
from msa_jax.model.memory_view import MemoryView
from msa_jax.model.model import MSAForCausalLM
from msa_jax.sharding import make_mesh
from tests.bank_fixtures import bank_from_encoded

HEAD = [1, 2, 3]
DOCS = [[5, 9, 3, 7, 2, 8, 11], [12, 4, 6, 30], [40, 41, 42, 43, 44, 45, 46, 47, 48], [60, 61, 62]]


def _request(question, tail=(4,), max_new=6, stop_ids=()):
  tokens = HEAD + list(question) + list(tail)
  route = [False] * len(HEAD) + [True] * len(question) + [False] * len(tail)
  return Request(tokens=tokens, route_mask=route, max_new_tokens=max_new, stop_ids=tuple(stop_ids))


# at most 8 new tokens and 16 prompt tokens: every test shares the same few compiled buckets
REQUESTS = [_request([70, 71, 72], max_new=7), _request([80, 81], tail=(4, 90, 91, 92), max_new=5),
            _request([100, 101, 102, 103, 104], max_new=8)]


@pytest.fixture(scope="module")
def setup():
  model_cfg, msa_cfg = cfglib.preset("tiny")  # router layers 2, 3; k = 2; P = 4
  model = MSAForCausalLM(model_cfg.replace(compute_dtype="float32"), msa_cfg)
  memory, prompt = _batch([_request([70])], [])
  # seed 1: greedy continuations that do not repeat one token, so stop ids can be tested
  params = nn.unbox(jax.jit(model.init)(jax.random.key(1), prompt, memory)["params"])
  encoded = jax.jit(entry_points.encode_memory, static_argnums=0)(model, params, memory,
                                                                  jnp.asarray(HEAD))
  return model, params, Engine(model, params, encoded.view, max_batch=2)


def _batch(requests, answers):
  """The training layout (batch_builder) of requests with teacher-forced answers, every row over
  the same memory."""
  t = len(HEAD)
  samples = []
  for i, r in enumerate(requests):
    route = np.asarray(r.route_mask)
    q_end = t + int(route.sum())
    samples.append(Sample(documents=DOCS, template_head=r.tokens[:t], question=r.tokens[t:q_end],
                          template_tail=r.tokens[q_end:], answer=answers[i] if answers else [],
                          positive_docs=[0]))
  memory, prompt = build_batch(samples, seq_len_mem=32, seq_len_prompt=32, max_docs=4,
                               chunk_size=4, question_position=cfglib.preset("tiny")[1]
                               .question_position, pad_id=0)
  return jax.tree.map(jnp.asarray, memory), jax.tree.map(jnp.asarray, prompt)


def test_greedy_tokens_equal_training_forward_argmax_and_routing(setup):
  model, params, engine = setup
  gens = engine.generate(REQUESTS)
  assert [len(g.tokens) for g in gens] == [7, 5, 8] and not any(g.stopped for g in gens)
  memory, prompt = _batch(REQUESTS, [g.tokens[:-1] for g in gens])
  logits, out = jax.jit(lambda p, m, pr: model.apply({"params": p}, pr, m,
                                                     method=MSAForCausalLM.prompt_logits))(
      params, memory, prompt)
  logits = np.asarray(logits)
  for b, (r, g) in enumerate(zip(REQUESTS, gens)):
    n = len(r.tokens)
    predicted = logits[b, n - 1:n - 1 + len(g.tokens)].argmax(-1)
    np.testing.assert_array_equal(predicted, g.tokens)
    for j, routing in enumerate(g.routing):
      assert routing.layer == model.msa.router_layers[j]
      chosen = np.asarray(out.selection.doc_index)[j, b][np.asarray(out.selection.valid)[j, b]]
      chosen = np.sort(chosen)
      assert sorted(routing.doc_index.tolist()) == chosen.tolist() and len(chosen) == 2
      scores = np.asarray(out.doc_scores)[j, b]
      np.testing.assert_allclose(routing.scores, scores[routing.doc_index], atol=1e-6)
      assert np.all(np.diff(routing.scores) <= 0)  # best first


def test_cached_decode_equals_fresh_prefill_and_appends_compose(setup):
  _, _, engine = setup
  base = REQUESTS[:2]
  extra = [[200, 201, 202], [210]]  # rows of different lengths appended at once

  longer = [dataclasses.replace(r, tokens=list(r.tokens) + e,
                                route_mask=list(r.route_mask) + [False] * len(e))
            for r, e in zip(base, extra)]
  fresh, _ = engine.prefill(longer)
  fresh_logits = np.asarray(fresh.logits)

  state, _ = engine.prefill(base, budget=8)
  at_once = engine.append(state, extra)
  err = np.abs(np.asarray(at_once.logits)[:2] - fresh_logits[:2]).max()
  print(f"cached decode vs fresh prefill: max |Δlogits| = {err:.2e}")
  assert err < 1e-4
  np.testing.assert_array_equal(np.asarray(at_once.next_position), np.asarray(fresh.next_position))

  state, _ = engine.prefill(base, budget=8)
  for step in range(3):
    state = engine.append(state, [e[step:step + 1] for e in extra])
  np.testing.assert_allclose(np.asarray(state.logits)[:2], np.asarray(at_once.logits)[:2],
                             atol=1e-5)
  with pytest.raises(EngineError, match="room"):
    engine.append(state, [[1] * 6, []])


def test_decode_streams_cache_tiles_like_the_dense_reference(setup, monkeypatch):
  """Decode attends over the cache through the blockwise dispatch: with 8-token tiles the cache
  spans several key tiles (and the query tile is sized to the new tokens), and the appended
  tokens' logits equal the dense reference's."""
  model, params, _ = setup
  traced = []  # (queries, block_q) of every blockwise call traced
  original = blockwise.segment_attention

  def recording(q, *args):
    traced.append((q.shape[1], args[-2]))
    return original(q, *args)

  monkeypatch.setattr(blockwise, "segment_attention", recording)
  encoded = entry_points.encode_memory(model, params, _batch([_request([70])], [])[0],
                                       jnp.asarray(HEAD))
  tiled = model.clone(config=model.config.replace(attention_block=8))
  dense = model.clone(attention_impl="reference")
  logits = []
  for m in (tiled, dense):
    engine = Engine(m, params, encoded.view, max_batch=2)
    state, _ = engine.prefill(REQUESTS[:2], budget=8)
    state = engine.append(state, [[200, 201, 202], [210]])
    state = engine.append(state, [[203], [211]])
    logits.append(np.asarray(state.logits)[:2])
  assert (3, 4) in traced and (1, 1) in traced  # the appends went through blockwise
  np.testing.assert_allclose(logits[0], logits[1], atol=1e-5)


def test_batching_and_padding_do_not_change_tokens(setup):
  _, _, engine = setup
  together = engine.generate(REQUESTS)  # max_batch 2: batches of 2 and 1 (padded rows, buckets)
  for r, g in zip(REQUESTS, together):
    alone = engine.generate([r])[0]
    assert alone.tokens == g.tokens and alone.stopped == g.stopped
    for a, b in zip(alone.routing, g.routing):
      np.testing.assert_array_equal(a.doc_index, b.doc_index)


def test_a_bank_view_on_four_memory_shards_generates_the_same(setup):
  model, params, engine = setup
  bank = bank_from_encoded(engine.view)
  view = open_view(bank, make_mesh((4,), ("memory",)), model.msa, slot_multiple=4)
  over_bank = Engine(model, params, view, max_batch=2).generate(REQUESTS)
  for g, ref in zip(over_bank, engine.generate(REQUESTS)):
    assert g.tokens == ref.tokens and g.stopped == ref.stopped
    for a, b in zip(g.routing, ref.routing):
      np.testing.assert_array_equal(a.doc_index, b.doc_index)  # global = in-memory document order
      np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_backbone_engine_equals_greedy_by_full_forward(setup):
  """Without memory the engine serves the Qwen3 backbone: plain prompts at positions 0..n-1. The
  oracle re-runs the whole plain forward (no cache, no memory) for every token."""
  model, params, _ = setup
  engine = Engine(model, params, backbone=True, max_batch=2)
  prompts = [[7, 8, 9, 10], [20, 21], [30, 31, 32, 33, 34, 35]]
  gens = engine.generate([Request(p, [False] * len(p), max_new_tokens=6) for p in prompts])
  forward = jax.jit(lambda p, tokens: model.apply({"params": p}, plain_prompt(tokens),
                                                  method=MSAForCausalLM.prompt_logits)[0])
  for p, g in zip(prompts, gens):
    ids = list(p)
    for _ in range(6):
      ids.append(int(np.argmax(np.asarray(forward(params, jnp.asarray([ids])))[0, -1])))
    assert g.tokens == ids[len(p):] and not g.stopped
    assert g.routing == []  # nothing routed
  with pytest.raises(EngineError, match="takes no view"):
    Engine(model, params, setup[2].view, backbone=True)


def test_stop_ids_and_max_new_tokens(setup):
  _, _, engine = setup
  free = engine.generate([REQUESTS[2]])[0].tokens
  j = next(i for i in range(2, len(free)) if free[i] not in free[:i])  # its first occurrence
  stopped = engine.generate([dataclasses.replace(REQUESTS[2], stop_ids=(free[j], 499))])[0]
  assert stopped.tokens == free[:j + 1] and stopped.stopped
  short = engine.generate([dataclasses.replace(REQUESTS[2], max_new_tokens=2)])[0]
  assert short.tokens == free[:2] and not short.stopped
  first = engine.generate([dataclasses.replace(REQUESTS[2], stop_ids=(free[0],))])[0]
  assert first.tokens == free[:1] and first.stopped


def test_sampling_limits_equal_greedy_and_seeds_reproduce(setup):
  _, _, engine = setup
  greedy = [g.tokens for g in engine.generate(REQUESTS)]
  cold = engine.generate(REQUESTS, SamplingConfig(temperature=1e-6, seed=3))
  assert [g.tokens for g in cold] == greedy
  narrow = engine.generate(REQUESTS, SamplingConfig(temperature=1.0, top_p=1e-6, seed=4))
  assert [g.tokens for g in narrow] == greedy
  hot = SamplingConfig(temperature=2.0, seed=5)
  first = [g.tokens for g in engine.generate(REQUESTS, hot)]
  assert [g.tokens for g in engine.generate(REQUESTS, hot)] == first
  assert first != greedy
  engine.max_batch = 1
  try:  # one request per batch: a request's sample does not depend on its batch mates
    assert [g.tokens for g in engine.generate(REQUESTS, hot)] == first
  finally:
    engine.max_batch = 2
  other = [g.tokens for g in engine.generate(REQUESTS, dataclasses.replace(hot, seed=6))]
  assert other != first


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
  probs = np.array([[0.05, 0.5, 0.15, 0.3], [0.25, 0.25, 0.25, 0.25]])
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  for top_p in (0.3, 0.6, 0.7, 0.85, 0.97, 1.0):  # away from the cumulative sums (rounding)
    kept = np.isfinite(np.asarray(jax.jit(sampling.nucleus_logits)(logits, top_p)))
    for row, p in enumerate(probs):
      order = np.argsort(-p, kind="stable")
      mass = np.cumsum(p[order])
      size = int(np.searchsorted(mass, top_p) + 1)  # the smallest prefix reaching top_p
      expected = np.zeros(4, bool)
      expected[order[:size]] = True
      np.testing.assert_array_equal(kept[row], expected, err_msg=f"top_p={top_p} row={row}")


def test_bank_style_selection_reports_its_global_indices():
  sel = router.Selection(np.array([[[907, 12, -1]]]), np.array([[[0.9, 0.5, -np.inf]]]),
                         np.array([[[True, True, False]]]))  # [L_r=1, B=1, k=3]
  (routing,), = _routing(sel, (5,), 1)
  assert routing.layer == 5 and routing.doc_index.tolist() == [907, 12]
  np.testing.assert_allclose(routing.scores, [0.9, 0.5])


def test_bad_inputs_give_clear_errors(setup):
  model, params, engine = setup
  ok = REQUESTS[0]
  cases = [
      (dataclasses.replace(ok, tokens=[], route_mask=[]), "empty prompt"),
      (dataclasses.replace(ok, route_mask=ok.route_mask[:-1]), "route_mask has"),
      (dataclasses.replace(ok, route_mask=[False] * len(ok.tokens)), "selects no token"),
      (dataclasses.replace(ok, tokens=HEAD, route_mask=[True] * 3), "template head"),
      (dataclasses.replace(ok, tokens=list(ok.tokens[:-1]) + [10**6]),
       rf"tokens contains 1000000, outside \[0, {model.config.vocab_size}\)"),
      (dataclasses.replace(ok, max_new_tokens=0), "max_new_tokens"),
      (dataclasses.replace(ok, max_new_tokens=5000), "max_position_embeddings"),
  ]
  for request, message in cases:
    with pytest.raises(EngineError, match=message):
      engine.generate([REQUESTS[1], request])
  short = Engine(model, params, engine.view, max_prompt_len=8)
  with pytest.raises(EngineError, match="longer than the limit 8"):
    short.generate([REQUESTS[1]])
  with pytest.raises(EngineError, match="no requests"):
    engine.generate([])
  foreign = MemoryView(engine.view.layers, (1, 2))
  with pytest.raises(EngineError, match="another model"):
    Engine(model, params, foreign)
  other_model = model.clone(msa=model.msa.replace(router_layers=(1, 2, 3)))
  with pytest.raises(EngineError, match="another model"):
    Engine(other_model, params, engine.view)
  two_rows = MemoryView(jax.tree.map(lambda x: jnp.concatenate([x, x], axis=1),
                                     engine.view.layers), engine.view.router_layers)
  with pytest.raises(EngineError, match="2 memory rows"):
    Engine(model, params, two_rows)
  with pytest.raises(EngineError, match="needs a memory view"):
    Engine(model, params, None)
