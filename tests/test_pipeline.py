"""The grain input pipeline: shapes, buckets, determinism, resume, sharding, packing, errors."""

import dataclasses
import re

import numpy as np
import pytest

from msa_jax.data import prompt_format as pf
from msa_jax.data.batch_builder import BatchError, build_batch_bucketed
from msa_jax.data.datasets import OfficialBenchmark, OfficialQuery, OfficialRecords
from msa_jax.data.pipeline import (PipelineConfig, choose_step, iterator_state_from_json,
                                   iterator_state_to_json, make_dataset, make_iterator)
from msa_jax.data.records import make_record
from msa_jax.data.tokenizer import Tokenizer, build_byte_tokenizer
from msa_jax.config import MSAConfig
from msa_jax.data.synthetic import world_tokenizer
from msa_jax.data.synthetic.world import ATTRIBUTE_NAMES
from msa_jax.data.transcript import document_ids, num_steps, record_step_sample, record_step_samples
from msa_jax.training import data_setup
from msa_jax.training.train_config import DataConfig, PhaseConfig

MEM_BUCKETS = (64, 128, 256)
PROMPT_BUCKETS = (256, 384)


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(build_byte_tokenizer(extra_special_tokens=("<End-of-Retrieve>",)))


def _records(n=12, seed=0):
  """Records of 1..4 documents of varying length, one or two hops; question i names i."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    n_docs = 1 + i % 4
    docs = [f"r{i}d{j} " + "abcdefgh"[: int(rng.integers(1, 8))] * int(rng.integers(1, 4))
            for j in range(n_docs)]
    hops = [[i % n_docs]] if i % 2 else [[i % n_docs], [(i + 1) % n_docs]]
    out.append(make_record(docs, f"question {i}?", f"answer {i}", hops))
  return out


def _cfg(**overrides):
  kwargs = dict(batch_size=2, mem_buckets=MEM_BUCKETS, prompt_buckets=PROMPT_BUCKETS, max_docs=4,
                chunk_size=8, question_position=8, seed=0, read_threads=1, prefetch_buffer_size=2)
  kwargs.update(overrides)
  return PipelineConfig(**kwargs)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _record_ids(batch, tok):
  """The record index of each row, read back from its question."""
  _, prompt = batch
  return [int(re.search(r"question (\d+)\?", tok.decode(row)).group(1)) for row in prompt.tokens]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for (mem_a, prompt_a), (mem_b, prompt_b) in zip(a, b):
    for x, y in ((mem_a, mem_b), (prompt_a, prompt_b)):
      for field in dataclasses.fields(x):
        np.testing.assert_array_equal(getattr(x, field.name), getattr(y, field.name),
                                      err_msg=field.name)


def test_shapes_buckets_and_dtypes(tok):
  records = _records()
  it = make_iterator(records, tok, _cfg(batch_size=3))
  for batch in _take(it, 8):
    mem, prompt = batch
    assert isinstance(mem.tokens, np.ndarray) and isinstance(prompt.labels, np.ndarray)
    b, s_mem = mem.tokens.shape
    assert b == 3 and s_mem in MEM_BUCKETS
    assert prompt.tokens.shape[0] == 3 and prompt.tokens.shape[1] in PROMPT_BUCKETS
    assert mem.chunk_doc.shape == (3, s_mem // 8 + 4)
    assert prompt.doc_labels.shape == (3, 4)
    assert mem.tokens.dtype == np.int32 and prompt.route_mask.dtype == np.bool_
    # The smallest bucket fitting the longest row.
    longest = int((mem.segment_ids > 0).sum(1).max())
    assert s_mem == min(m for m in MEM_BUCKETS if m >= longest)
    longest = int((prompt.segment_ids > 0).sum(1).max())
    assert prompt.tokens.shape[1] == min(p for p in PROMPT_BUCKETS if p >= longest)


def test_deterministic_by_seed(tok):
  records = _records()
  a = _take(make_iterator(records, tok, _cfg(seed=5)), 10)
  b = _take(make_iterator(records, tok, _cfg(seed=5)), 10)
  _assert_batches_equal(a, b)
  c = _take(make_iterator(records, tok, _cfg(seed=6)), 10)
  assert [_record_ids(x, tok) for x in a] != [_record_ids(x, tok) for x in c]


# 12 records, batch 5: epochs end inside batches 3, 5 and 8.
@pytest.mark.parametrize("stop", [1, 3, 7])
def test_resume_from_state_is_exact(tok, stop):
  records, cfg = _records(), _cfg(batch_size=5)
  it = make_iterator(records, tok, cfg)
  _take(it, stop)
  state = iterator_state_to_json(it.get_state())
  expected = _take(it, 6)
  resumed = make_iterator(records, tok, cfg, state=state)
  _assert_batches_equal(_take(resumed, 6), expected)
  # set_state on a running iterator works as well, with the plain dict.
  other = make_iterator(records, tok, cfg)
  _take(other, 2)
  other.set_state(iterator_state_from_json(state))
  _assert_batches_equal(_take(other, 6), expected)


def test_epochs_reshuffle_and_cover_every_record_once(tok):
  records = _records(12)
  batches = list(make_iterator(records, tok, _cfg(batch_size=1, num_epochs=3)))
  assert len(batches) == 36
  ids = [_record_ids(b, tok)[0] for b in batches]
  epochs = [ids[:12], ids[12:24], ids[24:]]
  for epoch in epochs:
    assert sorted(epoch) == list(range(12))
  assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(12))
  unshuffled = list(make_iterator(records, tok, _cfg(batch_size=1, num_epochs=1, shuffle=False)))
  assert [_record_ids(b, tok)[0] for b in unshuffled] == list(range(12))


def test_drop_remainder(tok):
  batches = list(make_iterator(_records(12), tok, _cfg(batch_size=5, num_epochs=1)))
  assert len(batches) == 2


def test_two_shards_partition_the_records(tok):
  records = _records(12)
  seen = []
  for shard in range(2):
    cfg = _cfg(batch_size=1, num_epochs=1, shard_index=shard, shard_count=2)
    seen.append([_record_ids(b, tok)[0] for b in make_iterator(records, tok, cfg)])
  assert sorted(seen[0]) == list(range(0, 12, 2)) and sorted(seen[1]) == list(range(1, 12, 2))
  with pytest.raises(ValueError, match="shard 3 of 4 has no records"):
    make_dataset(records[:3], tok, _cfg(shard_index=3, shard_count=4))


def test_samples_follow_the_transcript(tok):
  """Each row is exactly `record_step_sample` of the chosen step; the steps vary by epoch."""
  records = _records(8)
  cfg = _cfg(batch_size=1, num_epochs=4, shuffle=False, seed=3)
  steps = []
  for k, batch in enumerate(make_iterator(records, tok, cfg)):
    index, epoch = k % 8, k // 8
    step = choose_step(records[index], index, epoch, seed=3)
    assert 0 <= step < num_steps(records[index])
    steps.append(step)
    expected = build_batch_bucketed([record_step_sample(records[index], step, tok)], MEM_BUCKETS,
                                    PROMPT_BUCKETS, max_docs=4, chunk_size=8, question_position=8,
                                    pad_id=tok.pad_id, vocab_size=tok.vocab_size)
    _assert_batches_equal([batch], [expected])
    _, prompt = batch
    labels, tokens, route = prompt.labels[0], prompt.tokens[0], prompt.route_mask[0]
    where = np.flatnonzero(labels != -1)
    np.testing.assert_array_equal(labels[where], tokens[where + 1])
    hops = records[index].hops
    target = (pf.END_OF_RETRIEVE + pf.final_answer(records[index].answer) if step == len(hops)
              else pf.round_ids(hops[step]))
    assert tok.decode(labels[where]) == target
    routed = tok.decode(tokens[route])
    newest = "" if step == 0 else pf.injected_documents(
        [(i, records[index].documents[i]) for i in hops[step - 1]])
    assert routed == pf.question_text(records[index].question) + newest
  # Every step of the two-hop records (even indices) is drawn, and a record's step varies by epoch.
  assert {steps[k] for k in range(32) if k % 2 == 0} == {0, 1, 2}
  assert any(len(set(steps[i::8])) > 1 for i in range(8))


def test_packing_never_splits_a_document(tok):
  records = _records(12)
  for mem, prompt in _take(make_iterator(records, tok, _cfg(batch_size=4)), 6):
    for row, index in enumerate(_record_ids((mem, prompt), tok)):
      docs = records[index].documents
      seg = mem.segment_ids[row]
      n = int((seg > 0).sum())
      assert (seg[n:] == 0).all()  # documents first, then padding
      starts = 0
      for d, text in enumerate(docs, start=1):
        ids = tok.encode(pf.wrap_document(d - 1, text))
        span = np.flatnonzero(seg == d)
        # Contiguous, complete, in order, holding exactly the wrapped document.
        np.testing.assert_array_equal(span, np.arange(starts, starts + len(ids)))
        np.testing.assert_array_equal(mem.tokens[row, span], ids)
        np.testing.assert_array_equal(mem.positions[row, span], np.arange(len(ids)))
        starts += len(ids)
      assert starts == n and seg.max() == len(docs)


def test_aligned_packing_puts_every_closing_id_in_its_own_chunk(tok):
  """Byte tokenizer oracle: `<|im_start|>` is one token, every other byte one token."""
  records = _records(12)
  p = 8
  for mem, prompt in _take(make_iterator(records, tok, _cfg(batch_size=4, doc_align_to=p)), 6):
    for row, index in enumerate(_record_ids((mem, prompt), tok)):
      for d, text in enumerate(records[index].documents):
        span = np.flatnonzero(mem.segment_ids[row] == d + 1)
        tokens = mem.tokens[row, span]
        body = 1 + len(f"[{d}]. {text}".encode())
        close = len(f"[{d}]".encode()) + 1
        start = -(-body // p) * p
        assert span.size == start + close
        assert tok.decode(tokens[:body]) == f"<|im_start|>[{d}]. {text}"
        assert (tokens[body:start] == tok.pad_id).all()
        assert tok.decode(tokens[start:]) == f"[{d}]<|im_end|>"
        last = mem.chunk_ids[row, span[-1]]  # the closing id is the document's last chunk, alone
        assert (mem.chunk_ids[row] == last).sum() == close
        assert (mem.chunk_ids[row, span[start:]] == last).all()


@pytest.mark.parametrize("chunk_size", [8, 64])
def test_aligned_synthetic_memories_fit_their_budget(chunk_size):
  """Budgets count the aligned layout exactly: 50 records of a small memory (tight gold shares,
  ids up to 5 digits drawn after budgeting) never overflow it, through the training pipeline."""
  world = world_tokenizer()
  memory_tokens = 512
  data = DataConfig(tasks={t: 1.0 for t in ("fact_lookup", "multi_hop", "niah_single",
                                            "niah_multi_key", "niah_multi_value")},
                    min_doc_tokens=16, max_doc_tokens=256, doc_id_max=100000, num_records=50,
                    max_docs=128, batch_size=5, prompt_buckets=(4096,))
  phase = PhaseConfig(name="p", steps=1, peak_lr=1e-3, end_lr=1e-4, memory_tokens=memory_tokens)
  msa = MSAConfig(chunk_size=chunk_size, align_doc_id=True)
  source = data_setup.record_source(data, phase, world, seed=0, align_to=msa.doc_align_to)
  used = []
  for i in range(len(source)):
    record = source[i]
    sample = record_step_samples(record, world, align_to=chunk_size)[0]
    assert sample.documents == [document_ids(world, d, text, chunk_size)
                                for d, text in zip(record.doc_ids, record.documents)]
    used.append(sample.memory_len)
    assert sample.memory_len <= memory_tokens, i
  assert max(used) > memory_tokens * 3 // 4  # memories are filled, not tiny
  cfg = dataclasses.replace(data_setup.pipeline_config(data, phase, msa, seed=0), num_epochs=1,
                            read_threads=1)
  assert cfg.doc_align_to == chunk_size and cfg.mem_buckets == (memory_tokens,)
  batches = list(make_iterator(source, world, cfg))  # a row past its bucket would raise
  assert len(batches) == 10
  for mem, _ in batches:
    assert mem.tokens.shape[1] == memory_tokens


def test_document_longer_than_a_row_raises(tok):
  records = _records(6)
  records[3] = make_record(["short", "x" * 300], "question 3?", "a", [[1]])
  with pytest.raises(BatchError, match=r"record 3 of the source .*document 1 has \d+ tokens, "
                                       r"longer than the largest memory bucket \(256\); documents "
                                       r"are never split"):
    _take(make_iterator(records, tok, _cfg(shuffle=False)), 3)
  records[3] = make_record(["y" * 150, "x" * 150], "question 3?", "a", [[1]])
  with pytest.raises(BatchError, match=r"record 3 of the source .*need \d+ tokens, more than the "
                                       r"largest memory bucket \(256\)"):
    _take(make_iterator(records, tok, _cfg(shuffle=False)), 3)
  records[3] = make_record(["y"], "question 3?" + "?" * 300, "a", [[0]])
  with pytest.raises(BatchError, match=r"record 3 of the source .*prompt needs \d+ tokens"):
    _take(make_iterator(records, tok, _cfg(shuffle=False)), 3)
  records[3] = make_record(["a", "b", "c", "d", "e"], "question 3?", "a", [[0]])
  with pytest.raises(BatchError, match=r"record 3 of the source .*5 documents, more than "
                                       r"max_docs=4"):
    _take(make_iterator(records, tok, _cfg(shuffle=False)), 3)


def test_official_records_source(tok):
  docs = [f"corpus document {i} " + "z" * (i % 11) for i in range(60)]
  queries = [OfficialQuery(f"question {q}?", f"answer {q}", (q, 59 - q)) for q in range(6)]
  source = OfficialRecords(OfficialBenchmark(docs, queries), memory_tokens=MEM_BUCKETS[-1],
                           length_fn=lambda text: len(tok.encode(text)), seed=1, max_docs=8)
  for mem, prompt in _take(make_iterator(source, tok, _cfg(batch_size=2, max_docs=8)), 4):
    assert mem.tokens.shape[1] == MEM_BUCKETS[-1]
    assert (prompt.doc_labels.sum(1) == 2).all()  # both golds are positives at every step


def test_state_json_round_trip():
  state = {"a": 1, "b": [1, {"c": None}], 7: (1, 2), "bytes": b"\x00\xff",
           "nested": {0: {"x": "y"}, 1: [True, 2.5]}}
  assert iterator_state_from_json(iterator_state_to_json(state)) == state
  with pytest.raises(TypeError, match="no JSON form"):
    iterator_state_to_json({"x": object()})


@pytest.mark.parametrize("overrides, message", [
    (dict(batch_size=0), "batch_size"),
    (dict(mem_buckets=()), "mem_buckets"),
    (dict(prompt_buckets=(0,)), "prompt_buckets"),
    (dict(shard_index=2, shard_count=2), "shard_index"),
    (dict(num_epochs=0), "num_epochs"),
    (dict(question_position=-1), "question_position"),
])
def test_bad_config(tok, overrides, message):
  with pytest.raises(ValueError, match=message):
    make_dataset(_records(), tok, _cfg(**overrides))


@pytest.fixture
def absl_flags_parsed():
  """grain's multiprocessing reads absl flags; mark them parsed for this test only."""
  from absl import flags
  was_parsed = flags.FLAGS.is_parsed()
  if not was_parsed:
    flags.FLAGS.mark_as_parsed()
  yield
  if not was_parsed:
    flags.FLAGS.unparse_flags()


def test_one_worker_matches_in_process_and_resumes(tok, absl_flags_parsed):
  records = _records(8)
  expected = _take(make_iterator(records, tok, _cfg(batch_size=3)), 5)
  it = make_iterator(records, tok, _cfg(batch_size=3, worker_count=1))
  try:
    got = _take(it, 2)
    state = iterator_state_to_json(it.get_state())
    got += _take(it, 3)
  finally:
    it.close()
  _assert_batches_equal(got, expected)
  resumed = make_iterator(records, tok, _cfg(batch_size=3, worker_count=1), state=state)
  try:
    _assert_batches_equal(_take(resumed, 3), expected[2:])
  finally:
    resumed.close()


def test_long_document_share_is_per_record_and_reproducible():
  """`long_doc_fraction` makes about that share of records long (every document within
  `long_max_doc_tokens`, some beyond `max_doc_tokens`), the rest short (all within it), decided
  by (seed, index) alone; with the share at 0 no record is long."""
  world = world_tokenizer()
  data = DataConfig(tasks={"fact_lookup": 1.0, "multi_hop": 1.0}, min_doc_tokens=16,
                    max_doc_tokens=48, long_doc_fraction=0.3, long_max_doc_tokens=160,
                    num_records=200, max_docs=128)
  phase = PhaseConfig(name="p", steps=1, peak_lr=1e-3, end_lr=1e-4, memory_tokens=1024)
  source = data_setup.record_source(data, phase, world, seed=3)
  longest = [max(len(world.encode(d)) for d in source[i].documents) for i in range(200)]
  long = [source.doc_tokens_of(i) == 160 for i in range(200)]
  assert 0.2 < np.mean(long) < 0.4
  assert all(n <= (160 if is_long else 48) for n, is_long in zip(longest, long))
  assert np.mean([n > 48 for n, is_long in zip(longest, long) if is_long]) > 0.9
  again = data_setup.record_source(data, phase, world, seed=3)
  assert again[17] == source[17]
  short = data_setup.record_source(dataclasses.replace(data, long_doc_fraction=0.0), phase, world,
                                   seed=3)
  assert max(max(len(world.encode(d)) for d in short[i].documents) for i in range(50)) <= 48


def _needle_pairs(**option):
  """Records of a fact-lookup + niah_multi_key mix without and with a data option: the fact
  lookups must come out unchanged; returns the (plain, changed) needle records."""
  world = world_tokenizer()
  data = DataConfig(tasks={"fact_lookup": 1.0, "niah_multi_key": 1.0}, min_doc_tokens=16,
                    max_doc_tokens=48, num_records=16, max_docs=128)
  phase = PhaseConfig(name="p", steps=1, peak_lr=1e-3, end_lr=1e-4, memory_tokens=2048)
  plain = data_setup.record_source(data, phase, world, seed=4)
  changed = data_setup.record_source(dataclasses.replace(data, **option), phase, world, seed=4)
  pairs = [(plain[i], changed[i]) for i in range(16)]
  assert {a.task for a, _ in pairs} == {"fact_lookup", "niah_multi_key"}
  assert all(a == b for a, b in pairs if a.task == "fact_lookup")
  return [(a, b) for a, b in pairs if a.task == "niah_multi_key"]


def test_synthetic_records_put_niah_keys_needles_in_multi_key_memories():
  """data.niah_keys sets how many needles of different keys a niah_multi_key memory holds (4 by
  default); the question asks one of them, and a fact lookup of the same mix is unchanged."""
  needles = lambda r: [d for d in r.documents if "special magic number for" in d]
  for a, b in _needle_pairs(niah_keys=12):
    assert len(needles(a)) == 4 and len(needles(b)) == 12
    keys = {d.split("special magic number for ")[1].split(" is")[0] for d in needles(b)}
    assert len(keys) == 12 and b.question.split(" for ")[1].split(" mentioned")[0] in keys


def test_synthetic_records_pass_card_distractors_to_needle_tasks():
  """data.card_distractors reaches the needle tasks (fact cards among a needle memory's
  distractors), and a fact lookup of the mix is unchanged."""
  is_card = lambda d: bool((m := re.match(r"\w+ \w+\. ([\w ]+): ", d)) and m[1] in ATTRIBUTE_NAMES)
  for a, b in _needle_pairs(card_distractors=0.5):
    assert not any(map(is_card, a.documents)) and sum(map(is_card, b.documents)) >= 5
    assert b.question == a.question and b.answer == a.answer


def test_synthetic_records_pass_name_negatives_context_distractors_and_misses_to_their_tasks():
  """The data options reach the generators of the tasks that take them (a needle record of the
  same mix is unchanged), with ids remapped as usual."""
  world = world_tokenizer()
  data = DataConfig(tasks={"fact_lookup": 1.0, "multi_hop": 1.0, "niah_single": 1.0},
                    min_doc_tokens=16, max_doc_tokens=48, num_records=40, max_docs=128,
                    doc_id_max=5000)
  phase = PhaseConfig(name="p", steps=1, peak_lr=1e-3, end_lr=1e-4, memory_tokens=1024)
  plain = data_setup.record_source(data, phase, world, seed=3)
  noisy = data_setup.record_source(dataclasses.replace(data, name_negatives=6,
                                                       context_distractors=2, miss_rate=0.5),
                                   phase, world, seed=3)
  tasks = {plain[i].task for i in range(40)}
  assert tasks == {"fact_lookup", "multi_hop", "niah_single"}
  for i in range(40):
    a, b = plain[i], noisy[i]
    if a.task == "niah_single":
      assert a == b
    else:
      assert b.injections and len(b.injections) == len(b.hops) and b.ids
      assert len(b.misses) == len(b.hops)
      assert a.documents != b.documents  # the near-namesakes replaced random distractors
  assert any(noisy[i].misses and any(noisy[i].misses) for i in range(40))
