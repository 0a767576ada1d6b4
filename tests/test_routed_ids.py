"""Retrieval rounds constrained to the routed documents (`inference/routed_ids.py`): the prefix tree,
the constrained greedy walk against an oracle that re-prefills the whole prompt at every step (no
cache, no append), and the driver's offer (routed ids not yet injected, plus end of retrieval)."""

import dataclasses

import numpy as np
import pytest

from msa_jax.data import prompt_format as pf
from msa_jax.inference.interleave import InMemoryDocuments, InterleaveConfig, InterleaveDriver
from msa_jax.inference.requests import Generation, LayerRouting
from msa_jax.inference.routed_ids import constrained_pick, generate_routed, prefix_tree
from tests.interleave_fixtures import ScriptedModel
from tests.test_engine import REQUESTS, setup  # noqa: F401 (the engine fixture)
from tests.test_interleave import DOCS, QUESTION, ANSWER, tok  # noqa: F401 (the tokenizer fixture)

ALLOWED = [[7, 8, 9], [7, 5], [11]]


def test_prefix_tree_refuses_sequences_it_could_not_end():
  tree = prefix_tree(ALLOWED)
  assert sorted(t for t in tree if t >= 0) == [7, 11]
  assert sorted(t for t in tree[7] if t >= 0) == [5, 8]
  for bad in ([[1, 2], [1, 2, 3]], [[1, 2, 3], [1, 2]], [[]]):
    with pytest.raises(ValueError):
      prefix_tree(bad)


def test_constrained_pick_takes_the_best_allowed_token():
  logits = np.zeros(16)
  logits[[3, 5, 8, 11]] = [9.0, 1.0, 2.0, 4.0]
  assert constrained_pick(logits, prefix_tree(ALLOWED)) == 11  # 3 is better, but not allowed
  assert constrained_pick(logits, prefix_tree(ALLOWED)[7]) == 8


def _oracle(engine, request, allowed):
  """The constrained greedy walk, each step scored by a fresh prefill of prompt + written."""
  node, written = prefix_tree(allowed), []
  while True:
    longer = dataclasses.replace(request, tokens=list(request.tokens) + written,
                                 route_mask=list(request.route_mask) + [False] * len(written))
    state, _ = engine.prefill([longer])
    token = constrained_pick(np.asarray(state.logits)[0], node)
    written.append(token)
    if -1 in node[token]:
      return written
    node = node[token]


def test_constrained_walk_equals_fresh_prefills_and_writes_an_allowed_sequence(setup):
  _, _, engine = setup
  seen = []

  def allowed(routing):
    seen.append([int(i) for i in np.asarray(routing[0].doc_index)])
    return [[20, 21, 22, 23], [20, 24], [30], [20, 21, 25]]

  out = generate_routed(engine, REQUESTS, [allowed] * len(REQUESTS))
  _, routing = engine.prefill(REQUESTS[:1])
  assert seen[0] == [int(i) for i in np.asarray(routing[0][0].doc_index)]  # its own routing
  for request, g in zip(REQUESTS, out):
    assert g.stopped and g.tokens in allowed([LayerRouting(0, np.zeros(1), np.zeros(1))])
    assert g.tokens == _oracle(engine, request, allowed(routing[0]))


def _routing(layers):
  return [LayerRouting(layer, np.array([r for r, _ in rows]), np.array([s for _, s in rows]))
          for layer, rows in layers.items()]


def _run_routed(tok, routing, display, picks, config):
  """Runs the driver with a scripted retrieve_fn: round n writes picks[n] (an id, then
  `<End-of-Retrieve>` once picks run out) and must find it offered. Returns (offers, result)."""
  offers = []

  def retrieve(requests, allowed):
    out = []
    for fn in allowed:
      offer = fn(routing)
      offers.append(sorted(tok.decode(seq) for seq in offer))
      n = len(offers) - 1
      choice = tok.encode(f"[{picks[n]}]<|object_ref_end|>" if n < len(picks)
                          else pf.END_OF_RETRIEVE)
      assert list(choice) in [list(seq) for seq in offer]
      out.append(Generation(tokens=list(choice), stopped=True, routing=routing))
    return out

  model = ScriptedModel(tok, {QUESTION: [pf.final_answer(ANSWER)]})
  docs = DOCS + tuple(f"doc {i}" for i in range(len(display) - len(DOCS)))
  (result,) = InterleaveDriver(model, tok, InMemoryDocuments(docs, display), config,
                               retrieve_fn=retrieve).run([QUESTION])
  assert len(model.calls) == 1  # only the answer went through the free generate_fn
  return offers, result


def _offer(*display_ids):
  return sorted([pf.END_OF_RETRIEVE] + [f"[{i}]<|object_ref_end|>" for i in display_ids])


def test_driver_offers_the_routed_documents_not_yet_injected(tok):
  routing = _routing({3: [(1, 0.5), (0, 0.1)], 4: [(2, 0.9), (-1, 0.0)]})
  offers, result = _run_routed(tok, routing, [50, 51, 52], [51], InterleaveConfig(routed_ids=True))
  assert offers == [_offer(50, 51, 52), _offer(50, 52)]  # 51 was injected in round 0
  assert result.rounds[0].injected_ids == [51]
  assert result.answer == ANSWER


def test_routed_choices_offers_the_best_scored_documents_only(tok):
  # best score per document over layers: 52 -> 0.9, 51 -> 0.7 (layer 4 beats layer 3's 0.5),
  # 53 -> 0.3, 50 -> 0.1
  routing = _routing({3: [(1, 0.5), (0, 0.1)], 4: [(2, 0.9), (1, 0.7)], 5: [(3, 0.3), (-1, 0.0)]})
  offers, result = _run_routed(tok, routing, [50, 51, 52, 53], [51, 53],
                               InterleaveConfig(routed_ids=True, routed_choices=2))
  # the two best not yet injected, each round: {52, 51}; 51 taken: {52, 53}; 53 taken: {52, 50}
  assert offers == [_offer(51, 52), _offer(52, 53), _offer(50, 52)]
  assert [r.injected_ids for r in result.rounds[:2]] == [[51], [53]]
  assert result.answer == ANSWER


def test_routed_ids_needs_a_retrieve_fn_and_excludes_router_only(tok):
  with pytest.raises(ValueError, match="retrieve_fn"):
    InterleaveDriver(ScriptedModel(tok, {}), tok, InMemoryDocuments(DOCS),
                     InterleaveConfig(routed_ids=True))
  with pytest.raises(ValueError, match="router_only"):
    InterleaveConfig(routed_ids=True, router_only=True)
  with pytest.raises(ValueError, match="routed_ids too"):
    InterleaveConfig(routed_choices=1)
  with pytest.raises(ValueError, match="routed_choices must be >= 0"):
    InterleaveConfig(routed_ids=True, routed_choices=-1)
