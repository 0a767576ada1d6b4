"""The Memory Interleave driver on scripted model outputs: its contexts are the training samples'
contexts, and ids, unknown ids, no ids, end of retrieval, a model that never answers and the
router-only mode behave as specified."""

import numpy as np
import pytest

from msa_jax.data import prompt_format as pf
from msa_jax.data.records import make_record
from msa_jax.data.synthetic import generate, world_tokenizer
from msa_jax.data.tokenizer import Tokenizer, build_byte_tokenizer
from msa_jax.data.transcript import num_steps, record_step_sample
from msa_jax.inference.interleave import (InMemoryDocuments, InterleaveConfig, InterleaveDriver)
from msa_jax.inference.requests import LayerRouting
from tests.interleave_fixtures import ScriptedModel

DOCS = ("Bill Watts (born May 5, 1939) is a promoter.",
        "The Eiffel Tower is in Paris.",
        "Erik Watts is the son of Bill Watts.")
QUESTION = "When was Erik Watts' father born?"
ANSWER = "May 5, 1939"
OTHER = "Where is the tower?"


def _byte_tokenizer(eor_special: bool) -> Tokenizer:
  extra = (pf.END_OF_RETRIEVE,) if eor_special else ()
  return Tokenizer(build_byte_tokenizer(extra_special_tokens=extra))


@pytest.fixture(scope="module")
def tok():
  return _byte_tokenizer(True)


def _sample_prompt(sample, upto_answer: int = 0):
  """A training sample's prompt ids and route flags, with the first `upto_answer` answer tokens."""
  tokens = (list(sample.template_head) + list(sample.question) + list(sample.template_tail) +
            list(sample.context) + list(sample.answer[:upto_answer]))
  route = ([False] * len(sample.template_head) + [True] * len(sample.question) +
           [False] * len(sample.template_tail) + list(sample.context_route) +
           [False] * upto_answer)
  return tokens, route


@pytest.mark.parametrize("tokenizer_kind", ["byte_eor_special", "byte_eor_text", "world"])
def test_contexts_equal_training_samples(tokenizer_kind):
  """The context of round h is step h's training context; the answer step's is the sample's
  prompt up to the final answer (after `<End-of-Retrieve>` and the restatement)."""
  if tokenizer_kind == "world":
    tok = world_tokenizer()
    record = generate("multi_hop", 0, 0, memory_tokens=160, max_doc_tokens=32, num_hops=2,
                      max_docs=3)
    assert len(record.documents) == 3
  else:
    tok = _byte_tokenizer(tokenizer_kind == "byte_eor_special")
    record = make_record(DOCS, QUESTION, ANSWER, [[2], [0]])
    assert record.hops == ((2,), (0,))
  record = record.with_ids([40, 7, 1234])  # display ids as a bank numbers them
  first, second = (record.doc_ids[h[0]] for h in record.hops)
  assert (len(tok.encode(pf.END_OF_RETRIEVE)) == 1) == (tokenizer_kind != "byte_eor_text")
  script = [pf.round_ids([first]), pf.round_ids([second]),
            pf.END_OF_RETRIEVE + pf.restatement(record.question), pf.final_answer(record.answer)]
  model = ScriptedModel(tok, {record.question: script})
  driver = InterleaveDriver(model, tok, InMemoryDocuments(record.documents, record.doc_ids))
  (result,) = driver.run([record.question])
  # calls: one per retrieval step (the last writes `<End-of-Retrieve>`), then the answer
  assert len(model.calls) == num_steps(record) + 1
  answer_step = len(record.hops)
  given = (len(tok.encode(pf.END_OF_RETRIEVE)) +
           len(tok.encode(pf.restatement(record.question))))
  for call, (step, upto) in enumerate([(h, 0) for h in range(num_steps(record))] +
                                      [(answer_step, given)]):
    (request,) = model.calls[call]
    tokens, route = _sample_prompt(record_step_sample(record, step, tok), upto)
    assert list(request.tokens) == tokens, call
    assert list(request.route_mask) == route, call
  (final,) = model.calls[-1]
  assert tok.decode(final.tokens).endswith(pf.restatement(record.question))
  assert result.status == "answered" and result.answer == record.answer
  assert [r.ids for r in result.rounds] == [[first], [second], [], []]
  assert [r.injected_ids for r in result.rounds] == [[first], [second], [], []]
  assert [r.phase for r in result.rounds] == ["retrieve", "retrieve", "retrieve", "answer"]
  assert result.retrieved_ids == [first, second]


def test_unknown_ids_are_reported_and_not_injected(tok):
  script = ["[2][99][2]" + pf.injection_end(), pf.END_OF_RETRIEVE, pf.final_answer(ANSWER)]
  model = ScriptedModel(tok, {QUESTION: script})
  (result,) = InterleaveDriver(model, tok, InMemoryDocuments(DOCS)).run([QUESTION])
  first = result.rounds[0]
  assert first.ids == [2, 99] and first.unknown_ids == [99] and first.injected_ids == [2]
  (second,) = model.calls[1]
  text = tok.decode(second.tokens)
  assert text.endswith("[2][99][2]<|object_ref_end|>[2]. " + DOCS[2] + "\n<|object_ref_end|>")
  routed = tok.decode([t for t, r in zip(second.tokens, second.route_mask) if r])
  assert routed == pf.question_text(QUESTION) + "[2]. " + DOCS[2] + "\n"
  assert result.answer == ANSWER and result.retrieved_ids == [2, 99]


def test_round_without_ids_injects_nothing_and_routes_on_the_question(tok):
  script = [pf.injection_end(), pf.END_OF_RETRIEVE, pf.final_answer(ANSWER)]
  model = ScriptedModel(tok, {QUESTION: script})
  (result,) = InterleaveDriver(model, tok, InMemoryDocuments(DOCS)).run([QUESTION])
  assert result.rounds[0].ids == [] and result.rounds[0].injected_ids == []
  (second,) = model.calls[1]
  assert tok.decode(second.tokens).endswith(pf.TEMPLATE_TAIL + "<|object_ref_end|>" * 2)
  routed = tok.decode([t for t, r in zip(second.tokens, second.route_mask) if r])
  assert routed == pf.question_text(QUESTION)
  assert result.status == "answered" and result.answer == ANSWER


def test_direct_answer_without_retrieval(tok):
  model = ScriptedModel(tok, {QUESTION: [pf.final_answer(ANSWER) + "trailing text"]})
  (result,) = InterleaveDriver(model, tok, InMemoryDocuments(DOCS)).run([QUESTION])
  assert len(model.calls) == 1
  assert result.status == "answered" and result.answer == ANSWER
  assert result.retrieved_ids == [] and result.rounds[0].phase == "answer"


def test_ids_written_with_end_of_retrieve_are_not_injected(tok):
  model = ScriptedModel(tok, {QUESTION: ["[1]" + pf.END_OF_RETRIEVE + "[2]<|object_ref_end|>",
                                         pf.final_answer(ANSWER)]})
  (result,) = InterleaveDriver(model, tok, InMemoryDocuments(DOCS)).run([QUESTION])
  (answer_request,) = model.calls[1]
  assert tok.decode(answer_request.tokens).endswith(
      pf.TEMPLATE_TAIL + "[1]" + pf.END_OF_RETRIEVE + pf.restatement(QUESTION))
  assert result.rounds[0].ids == [1] and result.rounds[0].injected_ids == []
  assert result.answer == ANSWER


def test_never_answering_stops_at_the_round_cap(tok):
  model = ScriptedModel(tok, {QUESTION: ["[0]<|object_ref_end|>"] * 10})
  config = InterleaveConfig(max_rounds=3)
  (result,) = InterleaveDriver(model, tok, InMemoryDocuments(DOCS), config).run([QUESTION])
  assert len(model.calls) == 3
  assert result.status == "round_cap" and result.answer == ""
  assert [r.injected_ids for r in result.rounds] == [[0], [0], [0]]


def test_round_without_a_stop_token_ends_the_question(tok):
  model = ScriptedModel(tok, {QUESTION: ["x" * 50]})
  config = InterleaveConfig(round_tokens=8)
  (result,) = InterleaveDriver(model, tok, InMemoryDocuments(DOCS), config).run([QUESTION])
  assert result.status == "no_stop" and len(result.rounds[0].tokens) == 8


def test_answer_cut_by_the_token_budget(tok):
  model = ScriptedModel(tok, {QUESTION: [pf.END_OF_RETRIEVE, pf.final_answer("x" * 40)]})
  config = InterleaveConfig(answer_tokens=40)
  (result,) = InterleaveDriver(model, tok, InMemoryDocuments(DOCS), config).run([QUESTION])
  assert result.status == "answer_truncated"
  assert result.answer == "x" * (40 - len(tok.encode(pf.ANSWER_PREFIX)))


def test_questions_advance_together(tok):
  model = ScriptedModel(tok, {
      QUESTION: ["[2]<|object_ref_end|>", "[0]<|object_ref_end|>", pf.END_OF_RETRIEVE,
                 pf.final_answer(ANSWER)],
      OTHER: [pf.END_OF_RETRIEVE, pf.final_answer("Paris")]})
  results = InterleaveDriver(model, tok, InMemoryDocuments(DOCS)).run([QUESTION, OTHER])
  assert [len(c) for c in model.calls] == [2, 2, 1, 1]
  assert [r.answer for r in results] == [ANSWER, "Paris"]
  assert [r.question for r in results] == [QUESTION, OTHER]
  assert results[0].retrieved_ids == [2, 0] and results[1].retrieved_ids == []


def _routing(rows_by_layer):
  return [LayerRouting(layer, np.asarray([r for r, _ in rows], np.int32),
                       np.asarray([s for _, s in rows], np.float32))
          for layer, rows in rows_by_layer.items()]


def test_router_only_injects_the_top_scored_documents(tok):
  display = [50, 51, 52]
  # layer 3 prefers row 1, layer 4 row 2 with a higher score: round 0 takes row 2 (id 52), then
  # round 1 (row 2 already injected) row 1 (id 51); -1 rows are padding.
  routing = lambda question, call: _routing({3: [(1, 0.5), (0, 0.1), (-1, 0.0)],
                                             4: [(2, 0.9), (1, 0.2), (-1, 0.0)]})
  model = ScriptedModel(tok, {QUESTION: ["ignored", "ignored", pf.final_answer(ANSWER)]},
                        routing=routing)
  config = InterleaveConfig(router_only=True, router_rounds=2, router_docs=1)
  (result,) = InterleaveDriver(model, tok, InMemoryDocuments(DOCS, display), config).run(
      [QUESTION])
  assert [r.injected_ids for r in result.rounds] == [[52], [51], []]
  assert result.retrieved_ids == [52, 51]
  assert [c[0].max_new_tokens for c in model.calls] == [1, 1, config.answer_tokens]
  assert result.rounds[0].routing[1].doc_ids == [52, 51]
  np.testing.assert_allclose(result.rounds[0].routing[1].scores, [0.9, 0.2], rtol=1e-6)
  (answer_request,) = model.calls[2]
  expected = (pf.TEMPLATE_TAIL + "[52]<|object_ref_end|>[52]. " + DOCS[2] + "\n<|object_ref_end|>"
              + "[51]<|object_ref_end|>[51]. " + DOCS[1] + "\n<|object_ref_end|>"
              + pf.END_OF_RETRIEVE + pf.restatement(QUESTION))
  assert tok.decode(answer_request.tokens).endswith(expected)
  routed = tok.decode([t for t, r in zip(answer_request.tokens, answer_request.route_mask) if r])
  assert routed == pf.question_text(QUESTION) + "[51]. " + DOCS[1] + "\n"
  assert result.answer == ANSWER


def test_routing_trace_uses_display_ids(tok):
  routing = lambda question, call: _routing({5: [(0, 0.7), (2, 0.3)]})
  model = ScriptedModel(tok, {QUESTION: ["[9]<|object_ref_end|>", pf.END_OF_RETRIEVE,
                                         pf.final_answer(ANSWER)]}, routing=routing)
  docs = InMemoryDocuments(DOCS, [9, 8, 7])
  (result,) = InterleaveDriver(model, tok, docs).run([QUESTION])
  assert result.rounds[0].routing[0].layer == 5
  assert result.rounds[0].routing[0].doc_ids == [9, 7]
  assert result.rounds[0].injected_ids == [9]


def test_question_longer_than_the_limit_is_a_clear_error(tok):
  model = ScriptedModel(tok, {QUESTION: [], "x" * 300: []})
  driver = InterleaveDriver(model, tok, InMemoryDocuments(DOCS),
                            InterleaveConfig(max_context_tokens=256, round_tokens=16))
  with pytest.raises(ValueError, match=r"question 1 .* more than max_context_tokens=256"):
    driver.run([QUESTION, "x" * 300])
  assert model.calls == []
  with pytest.raises(ValueError, match="question 0 is empty"):
    driver.run([" "])


def test_context_that_outgrows_the_limit_ends_the_question(tok):
  model = ScriptedModel(tok, {QUESTION: ["[0]<|object_ref_end|>"] * 5})
  prompt = len(tok.encode(pf.TEMPLATE_HEAD + pf.question_text(QUESTION) + pf.TEMPLATE_TAIL))
  config = InterleaveConfig(max_context_tokens=prompt + 16 + 30, round_tokens=16)
  (result,) = InterleaveDriver(model, tok, InMemoryDocuments(DOCS), config).run([QUESTION])
  assert result.status == "context_full" and len(result.rounds) == 1
