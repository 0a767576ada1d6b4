"""File datasets: JSONL records, the official benchmark files, bad inputs, OfficialRecords."""

import json
import os
import pickle

import pytest

from msa_jax.data import prompt_format as pf
from msa_jax.data.datasets import (JsonlRecords, OfficialBenchmark, OfficialQuery, OfficialRecords,
                                   read_jsonl, read_official, write_jsonl)
from msa_jax.data.records import RecordError, make_record


def _records():
  return [
      make_record(["alpha doc", "beta doc", "gamma doc"], "Which is beta?", "beta", [[1]],
                  task="fact_lookup"),
      make_record(["ünïcode ✓ doc", "second"], "Chain?", "x", [[0], [1]], task="multi_hop"),
      make_record(["only"], "Flat ids?", "", [0]),
  ]


def _write_lines(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


GOOD = json.dumps({"documents": ["a", "b"], "question": "q?", "answer": "a",
                   "positive_ids": [[0]]})


# --------------------------------------------------------------------------------------- JSONL


def test_jsonl_round_trip(tmp_path):
  path = str(tmp_path / "sub" / "records.jsonl")
  write_jsonl(_records(), path)
  assert read_jsonl(path) == _records()
  assert [f for f in os.listdir(tmp_path / "sub")] == ["records.jsonl"]  # no temp file left
  source = JsonlRecords(path)
  assert len(source) == 3 and source[1] == _records()[1] and source[-1].hops == ((0,),)


def test_jsonl_flat_ids_blank_lines_and_optional_task(tmp_path):
  obj = {"documents": ["a", "b"], "question": "q?", "answer": "a", "positive_ids": [1, 0]}
  path = _write_lines(tmp_path / "r.jsonl", ["", json.dumps(obj), "   ", GOOD, ""])
  records = read_jsonl(path)
  assert [r.hops for r in records] == [((1, 0),), ((0,),)]
  assert records[0].task == ""


def test_write_jsonl_replaces_atomically_and_cleans_up_on_error(tmp_path):
  path = str(tmp_path / "r.jsonl")
  write_jsonl(_records()[:1], path)

  def failing():
    yield _records()[0]
    raise RuntimeError("boom")

  with pytest.raises(RuntimeError):
    write_jsonl(failing(), path)
  assert read_jsonl(path) == _records()[:1]  # the old file is untouched
  assert os.listdir(tmp_path) == ["r.jsonl"]


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"documents": ["a"], "question": "q", "answer": "a"}), "missing key.*positive_ids"),
    (json.dumps({"question": "q", "answer": "a", "positive_ids": [0]}), "missing key.*documents"),
    (json.dumps({"documents": ["a", "b"], "question": "q", "answer": "a", "positive_ids": [[2]]}),
     r"positive id 2 .*\[0, 2\)"),
    (json.dumps({"documents": ["a"], "question": "q", "answer": "a", "positive_ids": [[-1]]}),
     "positive id -1"),
    (json.dumps({"documents": ["a"], "question": "q", "answer": "a", "positive_ids": [["0"]]}),
     "positive id '0'"),
    (json.dumps({"documents": ["a"], "question": "q", "answer": "a", "positive_ids": []}),
     "no positive"),
    (json.dumps({"documents": ["a"], "question": "q", "answer": "a", "positive_ids": 0}),
     "positive_ids must be a list"),
    (json.dumps({"documents": "a", "question": "q", "answer": "a", "positive_ids": [0]}),
     "documents must be a list"),
    (json.dumps({"documents": ["a", ""], "question": "q", "answer": "a", "positive_ids": [0]}),
     "document 1 is empty"),
    (json.dumps({"documents": ["a"], "question": "", "answer": "a", "positive_ids": [0]}),
     "question must be"),
    (json.dumps({"documents": ["a"], "question": "q", "answer": 3, "positive_ids": [0]}),
     "answer must be"),
    (json.dumps({"documents": ["a"], "question": "q", "answer": "a", "positive_ids": [0],
                 "task": 5}), "task must be"),
])
def test_jsonl_bad_line_names_path_and_line(tmp_path, line, message):
  path = _write_lines(tmp_path / "bad.jsonl", [GOOD, "", line])
  with pytest.raises(RecordError, match=message) as e:
    read_jsonl(path)
  assert f"{path}:3:" in str(e.value)


def test_files_that_are_not_utf8_name_the_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_bytes((GOOD + "\n\n" + GOOD.replace('"', '"é', 1) + "\n").encode("latin-1"))
  with pytest.raises(RecordError, match=r"bad.jsonl:3: not UTF-8 text"):
    read_jsonl(str(path))
  mem, qry = _official(tmp_path, MEMORY, [{"question": "q", "labels": [0], "answer": "a"}])
  with open(qry, "wb") as f:
    f.write('[\n{"question": "qué", "labels": [0], "answer": "a"}]'.encode("latin-1"))
  with pytest.raises(RecordError, match=r"q\w*.json:2: not UTF-8 text"):
    read_official(mem, qry)


def test_jsonl_empty_file(tmp_path):
  path = tmp_path / "empty.jsonl"
  path.write_text("\n\n")
  with pytest.raises(RecordError, match="no records"):
    read_jsonl(str(path))
  with pytest.raises(RecordError, match="no records"):
    JsonlRecords(str(path))


# ------------------------------------------------------------------------------ official format

MEMORY = ["doc zero", "doc one", "doc two", "doc one", "doc four"]  # "doc one" twice


def _official(tmp_path, memory, queries, suffix=".json"):
  mem, qry = tmp_path / f"mdata{suffix}", tmp_path / f"qdata{suffix}"
  if suffix == ".json":
    mem.write_text(json.dumps(memory))
    qry.write_text(json.dumps(queries))
  else:
    mem.write_bytes(pickle.dumps(memory))
    qry.write_bytes(pickle.dumps(queries))
  return str(mem), str(qry)


def test_official_json_with_labels_and_reference_lists(tmp_path):
  queries = [{"question": "q0", "labels": [2, 0, 2], "answer": "a0"},
             {"query": "q1", "reference_list": ["doc one", "doc four"], "answer": "a1"}]
  bench = read_official(*_official(tmp_path, MEMORY, queries))
  assert bench.documents == MEMORY
  # Repeats are dropped; a duplicated text maps to its first index.
  assert bench.queries == [OfficialQuery("q0", "a0", (2, 0)), OfficialQuery("q1", "a1", (1, 4))]


def test_official_pickle_refused_without_flag_and_loaded_with_it(tmp_path):
  queries = [{"query": "q", "reference_list": ["doc two"], "answer": "a"}]
  mem, qry = _official(tmp_path, MEMORY, queries, suffix=".pkl")
  with pytest.raises(RecordError, match=r"is a pickle.*arbitrary code.*--allow_pickle"):
    read_official(mem, qry)
  json_mem, _ = _official(tmp_path, MEMORY, queries)
  with pytest.raises(RecordError, match=r"query file .*qdata.pkl is a pickle"):
    read_official(json_mem, qry)
  bench = read_official(mem, qry, allow_pickle=True)
  assert bench.documents == MEMORY and bench.queries == [OfficialQuery("q", "a", (2,))]
  os.rename(mem, mem.replace(".pkl", ".pickle"))
  with pytest.raises(RecordError, match="is a pickle"):
    read_official(mem.replace(".pkl", ".pickle"), qry)


def test_official_unknown_gold_text_names_query(tmp_path):
  queries = [{"query": "q", "reference_list": ["doc two"], "answer": "a"},
             {"query": "q", "reference_list": ["doc two", "doc 2"], "answer": "a"}]
  with pytest.raises(RecordError, match=r"query 1: reference_list\[1\].*not a document"):
    read_official(*_official(tmp_path, MEMORY, queries))


@pytest.mark.parametrize("memory, queries, message", [
    ([], [{"question": "q", "labels": [0], "answer": "a"}], "no documents"),
    (MEMORY, [], "no queries"),
    ({"a": 1}, [], "expected a list"),
    (["a", 3], [], "document 1 is a int"),
    (MEMORY, [{"question": "q", "labels": [5], "answer": "a"}], r"query 0: label 5 .*\[0, 5\)"),
    (MEMORY, [{"question": "q", "labels": [], "answer": "a"}], "query 0: no gold"),
    (MEMORY, [{"question": "q", "answer": "a"}], "query 0: needs 'reference_list'"),
    (MEMORY, [{"labels": [0], "answer": "a"}], "query 0: needs a non-empty string"),
    (MEMORY, [{"question": "q", "labels": [0]}], "query 0: missing key answer"),
    (MEMORY, [{"question": "q", "labels": [0], "answer": ["a"]}], "answer must be a string"),
    (MEMORY, ["q"], "query 0: expected an object"),
    (["", "x"], [{"question": "q", "labels": [0], "answer": "a"}], "gold document 0 is empty"),
])
def test_official_bad_inputs(tmp_path, memory, queries, message):
  with pytest.raises(RecordError, match=message):
    read_official(*_official(tmp_path, memory, queries))


def test_official_bad_json_and_empty_file(tmp_path):
  mem, qry = _official(tmp_path, MEMORY, [{"question": "q", "labels": [0], "answer": "a"}])
  with open(mem, "w") as f:
    f.write("")
  with pytest.raises(RecordError, match=r"memory file .* not valid JSON"):
    read_official(mem, qry)


# ------------------------------------------------------------------------------ OfficialRecords


def _bench(n_docs=40, n_queries=6):
  docs = [f"document number {i} " + "x" * (i % 7) for i in range(n_docs)]
  queries = [OfficialQuery(f"question {q}?", f"answer {q}",
                           ((3 * q) % n_docs, (5 * q + 1) % n_docs)) for q in range(n_queries)]
  return OfficialBenchmark(docs, queries)


def _length(text):
  return len(text.encode("utf-8"))


def _memory_len(record):
  return sum(_length(pf.wrap_document(i, d)) for i, d in enumerate(record.documents))


def test_official_records_deterministic_and_within_budget():
  bench = _bench()
  src = OfficialRecords(bench, memory_tokens=400, length_fn=_length, seed=3)
  again = OfficialRecords(bench, memory_tokens=400, length_fn=_length, seed=3)
  other = OfficialRecords(bench, memory_tokens=400, length_fn=_length, seed=4)
  assert len(src) == 6
  assert [src[i] for i in range(6)] == [again[i] for i in range(6)]
  assert [src[i] for i in (5, 0, 3)] == [again[i] for i in (5, 0, 3)]  # access order irrelevant
  assert [src[i] for i in range(6)] != [other[i] for i in range(6)]
  for i in range(6):
    record = src[i]
    assert record.task == "official" and record.question == f"question {i}?"
    assert _memory_len(record) <= 400
    # Greedy until a document does not fit: the slack is below one document (plus the id width
    # the selection reserves, 2 digits here where the real ids have 1, twice per document).
    largest = max(_length(pf.wrap_document(39, d)) for d in bench.documents)
    assert 400 - _memory_len(record) < largest + 2 * len(record.documents)
    assert len(set(record.documents)) == len(record.documents)
    gold_texts = {bench.documents[g] for g in bench.queries[i].gold_ids}
    (hop,) = record.hops
    assert list(hop) == sorted(hop)
    assert {record.documents[j] for j in hop} == gold_texts
    ids = src.global_ids(i)
    assert [bench.documents[j] for j in ids] == list(record.documents)
    assert set(bench.queries[i].gold_ids) <= set(ids)
  # The gold documents land at varying positions.
  assert len({src[i].hops for i in range(6)}) > 1


def test_official_records_max_docs_and_small_corpus():
  bench = _bench(n_docs=8)
  src = OfficialRecords(bench, memory_tokens=10_000, length_fn=_length, seed=0, max_docs=5)
  assert all(len(src[i].documents) == 5 for i in range(len(src)))
  whole = OfficialRecords(bench, memory_tokens=10_000, length_fn=_length, seed=0)
  assert sorted(whole[0].documents) == sorted(bench.documents)  # the corpus runs out


def test_official_records_gold_over_budget_and_bad_index():
  bench = _bench()
  src = OfficialRecords(bench, memory_tokens=30, length_fn=_length, seed=0)
  with pytest.raises(RecordError, match=r"official query 2: .*gold document\(s\) need \d+ tokens, "
                                        r"more than memory_tokens=30"):
    src[2]
  with pytest.raises(IndexError):
    src[6]
  with pytest.raises(RecordError, match="more than max_docs=1"):
    OfficialRecords(bench, memory_tokens=1000, length_fn=_length, seed=0, max_docs=1)[1]


def test_official_records_skip_empty_documents():
  docs = ["", "gold", "", "other", ""]
  bench = OfficialBenchmark(docs, [OfficialQuery("q?", "a", (1,))])
  record = OfficialRecords(bench, memory_tokens=10_000, length_fn=_length, seed=0)[0]
  assert sorted(record.documents) == ["gold", "other"]
