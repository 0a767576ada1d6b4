"""The batch builder: a hand-checked example, random-sample invariants, clear errors, buckets."""

import dataclasses

import numpy as np
import pytest

from msa_jax.data.batch_builder import (BatchError, Sample, bucket_length, build_batch,
                                        build_batch_bucketed)

PAD = 99
T, F = True, False


def _build(samples, **overrides):
  kwargs = dict(seq_len_mem=16, seq_len_prompt=10, max_docs=3, chunk_size=4, question_position=5,
                pad_id=PAD)
  kwargs.update(overrides)
  return build_batch(samples, **kwargs)


def _hand_samples():
  """Documents of lengths P, 6 (not a multiple of P), 3 (< P); 8 (a multiple of P), 2. P = 4."""
  return [
      Sample(documents=[[10, 11, 12, 13], [20, 21, 22, 23, 24, 25], [30, 31, 32]],
             template_head=[1, 2], question=[3, 4, 5], answer=[7, 8], positive_docs=[1],
             template_tail=[6]),
      Sample(documents=[[40, 41, 42, 43, 44, 45, 46, 47], [50, 51]], template_head=[],
             question=[9], answer=[11, 12, 13], positive_docs=[0, 1]),
  ]


def test_hand_example_field_by_field():
  mem, prompt = _build(_hand_samples())
  p = PAD
  expected_mem = dict(
      tokens=[[10, 11, 12, 13, 20, 21, 22, 23, 24, 25, 30, 31, 32, p, p, p],
              [40, 41, 42, 43, 44, 45, 46, 47, 50, 51, p, p, p, p, p, p]],
      segment_ids=[[1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 0, 0, 0],
                   [1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 0, 0, 0, 0, 0, 0]],
      positions=[[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 0, 0],
                 [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 0, 0, 0, 0, 0, 0]],
      chunk_ids=[[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3, 7, 7, 7],  # C_max = 16 // 4 + 3 = 7
                 [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 7, 7, 7, 7, 7, 7]],
      chunk_doc=[[1, 2, 2, 3, 0, 0, 0], [1, 1, 2, 0, 0, 0, 0]],
      chunk_len=[[4, 4, 2, 3, 0, 0, 0], [4, 4, 2, 0, 0, 0, 0]])
  T, F = True, False
  expected_prompt = dict(
      tokens=[[1, 2, 3, 4, 5, 6, 7, 8, p, p], [9, 11, 12, 13, p, p, p, p, p, p]],
      segment_ids=[[1, 1, 1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]],
      positions=[[0, 1, 5, 6, 7, 8, 9, 10, 0, 0], [5, 6, 7, 8, 0, 0, 0, 0, 0, 0]],
      route_mask=[[F, F, T, T, T, F, F, F, F, F], [T, F, F, F, F, F, F, F, F, F]],
      sees_memory=[[F, F, T, T, T, T, T, T, F, F], [T, T, T, T, F, F, F, F, F, F]],
      labels=[[-1, -1, -1, -1, -1, 7, 8, -1, -1, -1], [11, 12, 13, -1, -1, -1, -1, -1, -1, -1]],
      doc_labels=[[0, 1, 0], [1, 1, 0]])
  for batch, expected in ((mem, expected_mem), (prompt, expected_prompt)):
    for name, want in expected.items():
      got = getattr(batch, name)
      want = np.asarray(want)
      assert got.dtype == (np.bool_ if want.dtype == np.bool_ else np.int32), name
      np.testing.assert_array_equal(got, want, err_msg=name)
  assert mem.num_chunk_slots == 7


def test_markers_sit_where_labels_do():
  """answer_value / context_target mark target tokens; their masks sit one position earlier."""
  sample = Sample(documents=[[10]], template_head=[1], question=[2, 3], template_tail=[4],
                  context=[20, 21, 22, 23], context_route=[F, T, T, F],
                  context_target=[F, T, T, F], answer=[30, 31, 32, 33],
                  answer_target=[T, F, T, T], answer_value=[F, F, T, F], positive_docs=[0])
  _, prompt = _build([sample], seq_len_prompt=14)
  # tokens:  1  2  3  4 20 21 22 23 30 31 32 33  p  p
  np.testing.assert_array_equal(prompt.labels[0],
                                [-1] * 7 + [30, -1, 32, 33] + [-1] * 3)
  np.testing.assert_array_equal(np.flatnonzero(prompt.answer_mask[0]), [9])  # predicts 32
  np.testing.assert_array_equal(np.flatnonzero(prompt.context_mask[0]), [4, 5])  # 21, 22
  assert prompt.answer_mask.dtype == prompt.context_mask.dtype == np.bool_
  # no markers: nothing marked
  _, plain = _build(_hand_samples())
  assert not plain.answer_mask.any() and not plain.context_mask.any()


# --------------------------------------------------------------------------- random invariants


def _random_batch(seed):
  """Valid random samples and build arguments: doc lengths around multiples of P, empty heads,
  tails and answers, rows with no documents."""
  rng = np.random.default_rng(seed)
  P = int(rng.choice([1, 3, 4, 8]))
  max_docs, seq_len_mem = int(rng.integers(1, 6)), int(rng.integers(8, 41))
  question_position = 3 + int(rng.integers(1, 4))
  ids = lambda n: rng.integers(0, 50, n).tolist()
  samples = []
  for _ in range(int(rng.integers(1, 5))):
    docs, budget = [], seq_len_mem
    for _ in range(int(rng.integers(0, max_docs + 1))):
      length = max(1, P * int(rng.integers(0, 4)) + int(rng.choice([-1, 0, 0, 1, 2])))
      if length <= budget:
        docs.append(ids(length))
        budget -= length
    positives = rng.choice(len(docs), int(rng.integers(0, len(docs) + 1)), replace=False)
    samples.append(Sample(documents=docs, template_head=ids(rng.integers(0, 4)),
                          question=ids(rng.integers(1, 5)), answer=ids(rng.integers(0, 5)),
                          positive_docs=positives.tolist(), template_tail=ids(rng.integers(0, 3))))
  seq_len_prompt = max(s.prompt_len for s in samples) + int(rng.integers(0, 4))
  kwargs = dict(seq_len_mem=seq_len_mem, seq_len_prompt=seq_len_prompt, max_docs=max_docs,
                chunk_size=P, question_position=question_position, pad_id=PAD)
  return samples, kwargs


def _check_memory_row(mem, b, sample, P, c_max):
  seg, tok, pos, cid = (mem.segment_ids[b], mem.tokens[b], mem.positions[b], mem.chunk_ids[b])
  chunk_doc, chunk_len = mem.chunk_doc[b], mem.chunk_len[b]
  start = 0
  for d, doc in enumerate(sample.documents, start=1):
    idx = np.flatnonzero(seg == d)
    np.testing.assert_array_equal(idx, np.arange(start, start + len(doc)))  # contiguous, in order
    np.testing.assert_array_equal(tok[idx], doc)
    np.testing.assert_array_equal(pos[idx], np.arange(len(doc)))
    slots = np.flatnonzero(chunk_doc == d)
    lens = chunk_len[slots]
    assert len(slots) == -(-len(doc) // P) and lens.sum() == len(doc)
    assert (lens[:-1] == P).all() and 1 <= lens[-1] <= P
    np.testing.assert_array_equal(cid[idx] - slots[0], pos[idx] // P)  # cut at multiples of P
    start += len(doc)
  pad = seg == 0
  assert not pad[:start].any() and pad[start:].all()
  assert (tok[pad] == PAD).all() and (cid[pad] == c_max).all() and (pos[pad] == 0).all()
  used = cid[~pad]
  n_slots = used.max() + 1 if used.size else 0
  assert used.size == 0 or (used[0] == 0 and set(np.diff(used)) <= {0, 1})  # consecutive slots
  np.testing.assert_array_equal(chunk_doc[used], seg[~pad])  # each token's slot is its document's
  np.testing.assert_array_equal(chunk_len, np.bincount(used, minlength=c_max))
  assert (chunk_doc[n_slots:] == 0).all()


def _check_prompt_row(prompt, b, sample, question_position, max_docs):
  head, q, tail, ans = (list(x) for x in (sample.template_head, sample.question,
                                          sample.template_tail, sample.answer))
  seq = head + q + tail + ans
  n, T, S = len(seq), len(head), prompt.tokens.shape[1]
  np.testing.assert_array_equal(prompt.tokens[b], seq + [PAD] * (S - n))
  np.testing.assert_array_equal(prompt.segment_ids[b], [1] * n + [0] * (S - n))
  want_pos = list(range(T)) + [question_position + i for i in range(n - T)] + [0] * (S - n)
  np.testing.assert_array_equal(prompt.positions[b], want_pos)
  np.testing.assert_array_equal(prompt.route_mask[b], [T <= t < T + len(q) for t in range(S)])
  np.testing.assert_array_equal(prompt.sees_memory[b], [T <= t < n for t in range(S)])
  answer_start = n - len(ans)
  want_labels = [seq[t + 1] if answer_start <= t + 1 < n else -1 for t in range(S)]
  np.testing.assert_array_equal(prompt.labels[b], want_labels)
  np.testing.assert_array_equal(prompt.doc_labels[b],
                                [int(d in sample.positive_docs) for d in range(max_docs)])


@pytest.mark.parametrize("seed", range(40))
def test_random_samples_satisfy_invariants(seed):
  samples, kwargs = _random_batch(seed)
  mem, prompt = build_batch(samples, **kwargs)
  c_max = kwargs["seq_len_mem"] // kwargs["chunk_size"] + kwargs["max_docs"]
  assert mem.tokens.shape == (len(samples), kwargs["seq_len_mem"])
  assert mem.chunk_doc.shape == mem.chunk_len.shape == (len(samples), c_max)
  assert prompt.doc_labels.shape == (len(samples), kwargs["max_docs"])
  for b, sample in enumerate(samples):
    _check_memory_row(mem, b, sample, kwargs["chunk_size"], c_max)
    _check_prompt_row(prompt, b, sample, kwargs["question_position"], kwargs["max_docs"])


# --------------------------------------------------------------------------- errors


def _bad(**changes):
  """A batch whose sample 1 carries `changes` (no positives unless given); errors name sample 1."""
  good = _hand_samples()[0]
  return [good, dataclasses.replace(good, **{"positive_docs": [], **changes})]


@pytest.mark.parametrize("samples, overrides, match", [
    (_bad(documents=[list(range(17))]), {},
     r"sample 1: document 0 has 17 tokens, longer than a memory row \(seq_len_mem=16\)"),
    (_bad(documents=[[1] * 9, [2] * 8]), {},
     r"sample 1: documents need 17 tokens but seq_len_mem is 16"),
    (_bad(documents=[[1]] * 4), {}, r"sample 1: 4 documents, more than max_docs=3"),
    (_bad(documents=[[1], []]), {}, r"sample 1: document 1 is empty"),
    (_bad(question=[]), {}, r"sample 1: empty question, so no route tokens"),
    (_bad(answer=[7, 8, 9, 10, 11]), {},
     r"sample 1: prompt needs 11 tokens \(head 2, question 3, tail 1, context 0, answer 5\) but "
     r"seq_len_prompt is 10"),
    (_bad(template_head=[1] * 6, question=[3], template_tail=[], answer=[]), {},
     r"sample 1: template head has 6 tokens but the question starts at position 5"),
    (_bad(answer=[7, 512]), {"vocab_size": 512},
     r"sample 1: answer contains 512, outside \[0, 512\)"),
    (_bad(documents=[[1, 600]]), {"vocab_size": 512},
     r"sample 1: document 0 contains 600, outside \[0, 512\)"),
    (_bad(question=[-3]), {}, r"sample 1: question contains -3, outside \[0, 2147483648\)"),
    (_bad(template_tail=[2 ** 31]), {}, r"sample 1: template_tail contains 2147483648"),
    (_bad(positive_docs=[3]), {}, r"sample 1: positive_docs contains 3, outside \[0, 3\)"),
    (_bad(positive_docs=[-1]), {}, r"sample 1: positive_docs contains -1, outside \[0, 3\)"),
    (_bad(positive_docs=[0], documents=[]), {},
     r"sample 1: positive_docs contains 0, outside \[0, 0\)"),
    (_bad(template_head=[1.5]), {},
     r"sample 1: template_head must be a flat sequence of integer ids"),
    (_bad(documents=[1, 2, 3]), {}, r"sample 1: document 0 must be a flat sequence of integer ids"),
    (_bad(answer_value=[T]), {}, r"sample 1: answer_value has 1 flags but answer has 2 tokens"),
    (_bad(context=[5, 6], context_target=[T]), {},
     r"sample 1: context_target has 1 flags but context has 2 tokens"),
    (_bad(answer_target=[T, F], answer_value=[F, T]), {},
     r"sample 1: answer_value marks answer token 1, which is not a target"),
    (_hand_samples(), {"vocab_size": 64}, r"pad_id 99 outside \[0, 64\)"),
    (_hand_samples(), {"chunk_size": 0}, r"chunk_size must be positive, got 0"),
    (_hand_samples(), {"question_position": -1}, r"question_position must be >= 0"),
    ([], {}, r"no samples"),
])
def test_bad_inputs_raise_clear_errors(samples, overrides, match):
  with pytest.raises(BatchError, match=match):
    _build(samples, **overrides)


def test_in_range_ids_pass_with_vocab_size():
  mem, prompt = _build(_hand_samples(), vocab_size=100)
  assert mem.tokens.max() == PAD and prompt.labels.max() == 13


# --------------------------------------------------------------------------- buckets


def test_bucket_length_picks_the_smallest_fitting_bucket():
  assert bucket_length(5, [16, 4, 8]) == 8
  assert bucket_length(8, [16, 4, 8]) == 8
  assert bucket_length(0, [16, 4, 8]) == 4
  with pytest.raises(BatchError, match=r"17 tokens fit no bucket: the largest of \[4, 8, 16\] is "):
    bucket_length(17, [16, 4, 8])
  with pytest.raises(BatchError, match="no buckets given"):
    bucket_length(1, [])


def test_build_batch_bucketed_fits_the_longest_rows():
  samples = _hand_samples()  # memory rows of 13 and 10 tokens; prompts of 8 and 4
  kwargs = dict(max_docs=3, chunk_size=4, question_position=5, pad_id=PAD)
  mem, prompt = build_batch_bucketed(samples, [32, 8, 16, 64], [4, 8, 12], **kwargs)
  assert mem.tokens.shape == (2, 16) and mem.chunk_doc.shape == (2, 16 // 4 + 3)
  assert prompt.tokens.shape == (2, 8)
  ref_mem, ref_prompt = _build(samples, seq_len_prompt=8)
  for got, want in ((mem, ref_mem), (prompt, ref_prompt)):
    for field in dataclasses.fields(got):
      np.testing.assert_array_equal(getattr(got, field.name), getattr(want, field.name))
  with pytest.raises(BatchError, match=r"sample 0: memory row: 13 tokens fit no bucket"):
    build_batch_bucketed(samples, [8, 12], [8], **kwargs)
  with pytest.raises(BatchError, match=r"sample 0: prompt row: 8 tokens fit no bucket"):
    build_batch_bucketed(samples, [16], [4, 6], **kwargs)
