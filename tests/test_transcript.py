"""Record -> single-step training samples in MSA's generative-retrieval transcript format."""

import dataclasses

import numpy as np
import pytest

from msa_jax.data import prompt_format as pf
from msa_jax.data.batch_builder import build_batch
from msa_jax.data.records import make_record
from msa_jax.data.synthetic import generate, world_tokenizer
from msa_jax.data.tokenizer import CONTENT, Tokenizer, build_byte_tokenizer
from msa_jax.data.transcript import (document_ids, document_length_fn, num_steps,
                                     record_step_sample, record_step_samples)

DOCS = ("Bill Watts (born May 5, 1939) is a promoter.",
        "The Eiffel Tower is in Paris.",
        "Erik Watts is the son of Bill Watts.")
QUESTION = "When was Erik Watts' father born?"
ANSWER = "May 5, 1939"

# The prompt text of each step, written out by hand (MSA_REFERENCE_IMPL.md §5.3, paper Fig. 3).
HEAD = "<|im_start|>user\n"
PROMPT = ("\nPlease answer the question based on the above historical document information\n\n"
          "When was Erik Watts' father born?\n"
          "Please return all documents related to the question\n")
TAIL = "<|im_end|>\n<|im_start|>"
ROUND0 = "[2]<|object_ref_end|>"
INJECT0 = "[2]. Erik Watts is the son of Bill Watts.\n"
ROUND1 = "[0]<|object_ref_end|>"
INJECT1 = "[0]. Bill Watts (born May 5, 1939) is a promoter.\n"
END = "<|object_ref_end|>"
RESTATE = ("<|im_start|>The user's question is: When was Erik Watts' father born?\n"
           "<|object_ref_end|>")
FINAL = "The answer to the question is: May 5, 1939<|im_end|>"
EXPECTED_PROMPTS = [
    HEAD + PROMPT + TAIL + ROUND0,
    HEAD + PROMPT + TAIL + ROUND0 + INJECT0 + END + ROUND1,
    HEAD + PROMPT + TAIL + ROUND0 + INJECT0 + END + ROUND1 + INJECT1 + END
    + "<End-of-Retrieve>" + RESTATE + FINAL,
]
EXPECTED_TARGETS = [ROUND0, ROUND1, "<End-of-Retrieve>" + FINAL]
EXPECTED_ROUTED_CONTEXT = ["", INJECT0, INJECT1]
EXPECTED_POSITIVES = [[2], [0], [0]]


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(build_byte_tokenizer(extra_special_tokens=("<End-of-Retrieve>",)))


@pytest.fixture(scope="module")
def record():
  return make_record(DOCS, QUESTION, ANSWER, [[2], [0]], task="multi_hop")


def _prompt_ids(s):
  return (list(s.template_head) + list(s.question) + list(s.template_tail) + list(s.context) +
          list(s.answer))


def _build(samples, tok):
  return build_batch(samples, seq_len_mem=256, seq_len_prompt=512, max_docs=4, chunk_size=16,
                     question_position=8, pad_id=tok.pad_id, vocab_size=tok.vocab_size)


def test_num_steps(record):
  assert num_steps(record) == 3
  assert num_steps(make_record(DOCS, QUESTION, ANSWER, [1])) == 2


def test_prompt_text_of_every_step_is_exact(record, tok):
  samples = record_step_samples(record, tok)
  assert len(samples) == 3
  for step, sample in enumerate(samples):
    assert tok.decode(_prompt_ids(sample)) == EXPECTED_PROMPTS[step], step


def test_documents_are_wrapped_with_zero_based_ids(record, tok):
  sample = record_step_sample(record, 0, tok)
  assert [tok.decode(d) for d in sample.documents] == [
      f"<|im_start|>[{i}]. {text}[{i}]<|im_end|>" for i, text in enumerate(DOCS)]
  # Every step of a record shares the same memory.
  for s in record_step_samples(record, tok):
    assert [list(d) for d in s.documents] == [list(d) for d in sample.documents]


def test_pieces(record, tok):
  s = record_step_sample(record, 2, tok)
  assert tok.decode(s.template_head) == HEAD
  assert tok.decode(s.question) == PROMPT
  assert tok.decode(s.template_tail) == TAIL
  assert tok.decode(s.answer) == "<End-of-Retrieve>" + RESTATE + FINAL
  assert len(s.answer_target) == len(s.answer)
  assert len(s.context_route) == len(s.context)


def test_route_mask_covers_exactly_the_newest_injected_documents(record, tok):
  samples = record_step_samples(record, tok)
  _, prompt = _build(samples, tok)
  for step, s in enumerate(samples):
    tokens, route = prompt.tokens[step], prompt.route_mask[step]
    routed = np.flatnonzero(route)
    q0 = len(s.template_head)
    n_question = len(s.question)
    np.testing.assert_array_equal(routed[:n_question], np.arange(q0, q0 + n_question))
    assert tok.decode(tokens[routed[:n_question]]) == PROMPT
    rest = routed[n_question:]
    assert tok.decode(tokens[rest]) == EXPECTED_ROUTED_CONTEXT[step]
    if rest.size:  # one contiguous span, inside the context
      np.testing.assert_array_equal(rest, np.arange(rest[0], rest[0] + rest.size))
      context_start = q0 + n_question + len(s.template_tail)
      assert context_start <= rest[0] and rest[-1] < context_start + len(s.context)


def test_step1_routes_hop0_injection(record, tok):
  s = record_step_sample(record, 1, tok)
  routed = [t for t, r in zip(s.context, s.context_route) if r]
  assert tok.decode(routed) == INJECT0
  assert tok.decode(s.context) == ROUND0 + INJECT0 + END


def test_labels_only_on_targets_and_restatement_unlabelled(record, tok):
  samples = record_step_samples(record, tok)
  _, prompt = _build(samples, tok)
  for step, s in enumerate(samples):
    tokens, labels = prompt.tokens[step], prompt.labels[step]
    where = np.flatnonzero(labels != -1)
    np.testing.assert_array_equal(labels[where], tokens[where + 1])  # shifted next tokens
    assert tok.decode(labels[where]) == EXPECTED_TARGETS[step]
    # Nothing before the answer is a target.
    answer_start = s.prompt_len - len(s.answer)
    assert where.min() == answer_start - 1
  # The answer step: the tokens predicting the restatement carry -1.
  s = samples[2]
  answer_start = s.prompt_len - len(s.answer)
  n_eor = len(tok.encode("<End-of-Retrieve>"))
  n_restate = len(tok.encode(RESTATE))
  restate_positions = np.arange(answer_start + n_eor, answer_start + n_eor + n_restate)
  assert tok.decode(prompt.tokens[2][restate_positions]) == RESTATE
  assert (prompt.labels[2][restate_positions - 1] == -1).all()
  # ... but the last restatement token predicts the first answer token.
  assert prompt.labels[2][restate_positions[-1]] == prompt.tokens[2][restate_positions[-1] + 1]


def test_positives_per_step(record, tok):
  samples = record_step_samples(record, tok)
  assert [list(s.positive_docs) for s in samples] == EXPECTED_POSITIVES
  _, prompt = _build(samples, tok)
  np.testing.assert_array_equal(prompt.doc_labels, [[0, 0, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0]])


def test_multi_id_round_and_single_hop(tok):
  rec = make_record(DOCS, "Where is the tower?", "Paris", [[1, 0]])
  s0, s1 = record_step_samples(rec, tok)
  assert tok.decode(s0.answer) == "[1][0]<|object_ref_end|>"
  assert list(s0.context) == [] and list(s0.positive_docs) == [1, 0]
  assert tok.decode(s1.context) == ("[1][0]<|object_ref_end|>[1]. The Eiffel Tower is in Paris.\n"
                                    f"[0]. {DOCS[0]}\n<|object_ref_end|>")
  routed = [t for t, r in zip(s1.context, s1.context_route) if r]
  assert tok.decode(routed) == f"[1]. The Eiffel Tower is in Paris.\n[0]. {DOCS[0]}\n"
  assert list(s1.positive_docs) == [1, 0]


def test_bad_step(record, tok):
  for step in (-1, 3, True):
    with pytest.raises(ValueError, match="step"):
      record_step_sample(record, step, tok)


# --------------------------------------------------------------------------- loss markers


def _marked(ids, flags):
  return [t for t, f in zip(ids, flags) if f]


def test_markers_cover_the_answer_value_and_the_injected_documents(record, tok):
  samples = record_step_samples(record, tok)
  for s in samples[:-1]:  # retrieval steps have no answer value
    assert not any(s.answer_value)
  s = samples[-1]
  assert len(s.answer_value) == len(s.answer) and len(s.context_target) == len(s.context)
  assert tok.decode(_marked(s.answer, s.answer_value)) == " " + ANSWER
  assert all(_marked(s.answer_target, s.answer_value))  # the value is a target
  assert tok.decode(_marked(s.context, s.context_target)) == INJECT0 + INJECT1
  assert tok.decode(_marked(samples[1].context, samples[1].context_target)) == INJECT0
  # in the batch, each mask sits on the position that predicts a marked token
  _, prompt = _build(samples, tok)
  answer_at = np.flatnonzero(prompt.answer_mask[2])
  assert tok.decode(prompt.tokens[2][answer_at + 1]) == " " + ANSWER
  np.testing.assert_array_equal(prompt.labels[2][answer_at], prompt.tokens[2][answer_at + 1])
  assert tok.decode(prompt.tokens[2][np.flatnonzero(prompt.context_mask[2]) + 1]) == (
      INJECT0 + INJECT1)
  assert not prompt.answer_mask[:2].any() and not prompt.context_mask[0].any()


@pytest.mark.parametrize("task", ["multi_hop", "niah_single"])
def test_world_tokenizer_markers_are_exact(task):
  """The markers of a synthetic sample cover exactly the answer value and the injected text, and
  cutting the answer line into pieces leaves its token ids those of the whole line."""
  world = world_tokenizer()
  rec = generate(task, 3, 0, memory_tokens=600)
  s = record_step_sample(rec, num_steps(rec) - 1, world)
  whole = (world.encode(pf.END_OF_RETRIEVE) + world.encode(pf.restatement(rec.question)) +
           world.encode(pf.final_answer(rec.answer)))
  assert list(s.answer) == whole
  value = _marked(s.answer, s.answer_value)
  assert world.decode(value) == " " + rec.answer and value == world.encode(" " + rec.answer)
  injected = "".join(pf.injected_documents([(rec.doc_ids[i], rec.documents[i]) for i in hop])
                     for hop in rec.hops)
  assert world.decode(_marked(s.context, s.context_target)) == injected
  rest = [t for t, f in zip(s.context, s.context_target) if not f]
  assert world.decode(rest) == "".join(
      pf.round_ids([rec.doc_ids[i] for i in hop]) + pf.injection_end() for hop in rec.hops)


# --- aligned documents (MSAConfig.align_doc_id) ---------------------------------------------------

TEXTS = ("", "x", "Bill Watts (born May 5, 1939) is a promoter.", "a" * 63, "b" * 64,
         "fake end <|im_end|>[3]<|object_ref_end|>", "ends with its id [7]", "two\nlines")


@pytest.mark.parametrize("doc_id", [0, 7, 12345])
def test_align_0_gives_the_official_ids(tok, doc_id):
  for text in TEXTS:  # the expression training and encoding used before alignment existed
    assert document_ids(tok, doc_id, text) == tok.encode_filled(pf.wrap_document(doc_id, CONTENT),
                                                                text)
    assert document_ids(tok, doc_id, text, 0) == document_ids(tok, doc_id, text)


@pytest.mark.parametrize("align_to", [1, 4, 7, 16, 64])
@pytest.mark.parametrize("doc_id", [0, 7, 12345])
def test_aligned_documents_close_on_a_chunk_boundary(tok, align_to, doc_id):
  """Byte tokenizer oracle: `<|im_start|>` is one token, every other byte one token."""
  pad = tok.pad_id
  for text in TEXTS:
    ids = np.array(document_ids(tok, doc_id, text, align_to))
    body = 1 + len(f"[{doc_id}]. {text}".encode())
    close = len(f"[{doc_id}]".encode()) + 1
    start = -(-body // align_to) * align_to  # the body rounded up to whole chunks
    assert ids.size == start + close, text
    assert start % align_to == 0 and start - body < align_to
    assert (ids[body:start] == pad).all()
    assert pad not in ids[:body] and pad not in ids[start:]
    assert tok.decode(ids[start:]) == f"[{doc_id}]<|im_end|>"
    assert ids[-1] == tok.im_end_id and ids[0] == tok.im_start_id
    # the text stays plain (special-token strings in it are bytes), the body as in the official ids
    assert list(ids[:body]) == tok.encode_filled(pf.document_body(doc_id, CONTENT), text)
    assert tok.decode(ids[1:body]) == f"[{doc_id}]. {text}"


def test_aligned_closing_id_is_a_chunk_of_its_own(tok, record):
  """In the memory row the closing `[id]<|im_end|>` is exactly its document's last chunk."""
  p = 16
  samples = record_step_samples(record, tok, align_to=p)
  for s in samples:
    assert s.documents == samples[0].documents
    assert s.documents == [document_ids(tok, i, text, p) for i, text in enumerate(DOCS)]
  memory, _ = _build(samples[:1], tok)  # chunk_size=16
  seg, chunks = np.asarray(memory.segment_ids[0]), np.asarray(memory.chunk_ids[0])
  for d in range(len(DOCS)):
    span = np.flatnonzero(seg == d + 1)
    close = len(tok.encode(pf.document_close(d)))
    last = chunks[span[-1]]
    assert (chunks[span[-close:]] == last).all() and (chunks == last).sum() == close
    assert (span[-close] - span[0]) % p == 0


def test_aligned_samples_differ_only_in_their_documents(tok, record):
  for plain, aligned in zip(record_step_samples(record, tok),
                            record_step_samples(record, tok, align_to=16)):
    assert plain.documents != aligned.documents
    assert dataclasses.replace(plain, documents=aligned.documents) == aligned


@pytest.mark.parametrize("align_to", [0, 4, 64])
def test_document_length_fn_is_the_laid_out_length(tok, align_to):
  length = document_length_fn(tok, align_to)
  for doc_id in (0, 12345):
    for text in TEXTS:
      body = 1 + len(f"[{doc_id}]. {text}".encode())
      close = len(f"[{doc_id}]".encode()) + 1
      want = (-(-body // align_to) * align_to if align_to else body) + close
      if text != TEXTS[5]:  # plain bytes of `<|im_end|>` are more tokens than the special token
        assert length(pf.wrap_document(doc_id, text)) == want, text
      assert length(pf.wrap_document(doc_id, text)) == len(document_ids(tok, doc_id, text,
                                                                        align_to))


def test_unwrap_document_inverts_wrap_document():
  for doc_id in (0, 7, 12345):
    for text in TEXTS + (f"[{7}]", f"text[{12345}][{12345}]"):
      assert pf.unwrap_document(pf.wrap_document(doc_id, text)) == (doc_id, text)
  with pytest.raises(ValueError, match="not a wrapped document"):
    pf.unwrap_document("[1]. text[1]<|im_end|>")


def test_bad_align_to_raises(tok):
  with pytest.raises(ValueError, match="align_to must be >= 0"):
    document_ids(tok, 0, "x", -1)


def test_injections_put_distractors_in_the_context_not_in_the_targets(tok):
  """A record with injections writes and injects those documents in each round (as a router
  round does), routes on all of the newest, and keeps every step's target and positives gold."""
  docs = DOCS + ("Mia Watts is a pilot.",)
  plain = make_record(docs, QUESTION, ANSWER, [[2], [0]], task="multi_hop")
  noisy = plain.with_injections([(3, 2), (0,)])
  samples = record_step_samples(noisy, tok)
  inject0 = "[3]. Mia Watts is a pilot.\n" + INJECT0
  assert tok.decode(_prompt_ids(samples[1])) == (HEAD + PROMPT + TAIL + "[3][2]<|object_ref_end|>"
                                                 + inject0 + END + ROUND1)
  routed = [t for t, r in zip(samples[1].context, samples[1].context_route) if r]
  assert tok.decode(routed) == inject0
  for step, sample in enumerate(samples):
    target = [t for t, m in zip(sample.answer, sample.answer_target) if m]
    assert tok.decode(target) == EXPECTED_TARGETS[step]
    assert list(sample.positive_docs) == EXPECTED_POSITIVES[step]
  assert record_step_samples(plain, tok)[1].context != samples[1].context


@pytest.mark.parametrize("injections, message", [
    ([(2,)], "1 injections for 2 hops"),
    ([(3, 1), (0,)], r"injection 0 \[3, 1\] must hold hop \[2\]"),
    ([(2, 2), (0,)], r"must hold hop \[2\] once each"),
    ([(2, 7), (0,)], r"injection 0 \[2, 7\] is not within \[0, 4\)"),
])
def test_bad_injections_are_errors(injections, message):
  record = make_record(DOCS + ("Mia Watts is a pilot.",), QUESTION, ANSWER, [[2], [0]])
  with pytest.raises(ValueError, match=message):
    record.with_injections(injections)


def test_misses_add_rounds_that_inject_a_wrong_card_and_keep_the_gold_target(tok):
  """A miss round writes and injects one wrong card (as a router round that picked it does),
  routes on it, and the step after it still targets its hop's gold ids; the transcript goes on
  with the gold round, so later steps carry the miss too."""
  docs = DOCS + ("Mia Watts is a pilot.", "Erik Holm is a baker.")
  plain = make_record(docs, QUESTION, ANSWER, [[2], [0]], task="multi_hop")
  missed = plain.with_misses([(4,), (3,)])
  assert [tuple(r) for r in missed.rounds] == [(0, (4,), True), (0, (2,), False),
                                               (1, (3,), True), (1, (0,), False)]
  assert num_steps(missed) == 5
  samples = record_step_samples(missed, tok)
  miss0 = "[4]<|object_ref_end|>[4]. Erik Holm is a baker.\n" + END
  miss1 = "[3]<|object_ref_end|>[3]. Mia Watts is a pilot.\n" + END
  prompts = [HEAD + PROMPT + TAIL + ROUND0,
             HEAD + PROMPT + TAIL + miss0 + ROUND0,
             HEAD + PROMPT + TAIL + miss0 + ROUND0 + INJECT0 + END + ROUND1,
             HEAD + PROMPT + TAIL + miss0 + ROUND0 + INJECT0 + END + miss1 + ROUND1]
  targets = [ROUND0, ROUND0, ROUND1, ROUND1, "<End-of-Retrieve>" + FINAL]
  for step, sample in enumerate(samples):
    target = [t for t, m in zip(sample.answer, sample.answer_target) if m]
    assert tok.decode(target) == targets[step]
    assert list(sample.positive_docs) == [[2], [2], [0], [0], [0]][step]
    if step < 4:
      assert tok.decode(_prompt_ids(sample)) == prompts[step]
  routed = [t for t, r in zip(samples[1].context, samples[1].context_route) if r]
  assert tok.decode(routed) == "[4]. Erik Holm is a baker.\n"
  assert plain.with_misses([(), ()]).rounds == plain.rounds
  assert record_step_samples(plain.with_misses([(), ()]), tok) == record_step_samples(plain, tok)


@pytest.mark.parametrize("misses, message", [
    ([(3,)], "1 miss tuples for 2 hops"),
    ([(2,), ()], r"misses \[2\] of hop 0 must be non-gold documents"),
    ([(), (0,)], r"misses \[0\] of hop 1 must be non-gold"),
    ([(), (9,)], r"misses \[9\] of hop 1 must be non-gold documents within \[0, 4\)"),
])
def test_bad_misses_are_errors(misses, message):
  record = make_record(DOCS + ("Mia Watts is a pilot.",), QUESTION, ANSWER, [[2], [0]])
  with pytest.raises(ValueError, match=message):
    record.with_misses(misses)
