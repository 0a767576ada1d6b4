"""Corpus readers for bank encoding: JSONL, text files, the official memory list; clear errors."""

import json
import pickle

import pytest

from msa_jax.memory.corpus import Document, open_corpus
from msa_jax.memory.errors import BankError


def test_jsonl_corpus_streams_documents_with_optional_ids(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text('{"text": "alpha", "id": 12}\n\n{"text": "béta"}\n', encoding="utf-8")
  corpus = open_corpus(str(path), "jsonl")
  assert len(corpus) == 2
  assert list(corpus) == list(corpus) == [Document("alpha", 12), Document("béta", None)]


@pytest.mark.parametrize("line, message", [
    ("{not json", r"docs.jsonl:2: not valid JSON"),
    ('{"txt": "alpha"}', r"docs.jsonl:2: expected an object with a string 'text'"),
    ('["alpha"]', r"docs.jsonl:2: expected an object"),
    ('{"text": "a", "id": -3}', r"docs.jsonl:2: 'id' must be a non-negative integer"),
    ('{"text": "a", "id": "7"}', r"docs.jsonl:2: 'id' must be a non-negative integer"),
])
def test_jsonl_corpus_errors_name_the_line(tmp_path, line, message):
  path = tmp_path / "docs.jsonl"
  path.write_text('{"text": "fine"}\n' + line + "\n")
  with pytest.raises(BankError, match=message):
    list(open_corpus(str(path), "jsonl"))


def test_jsonl_corpus_that_is_not_utf8_names_the_line(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_bytes('{"text": "fine"}\n{"text": "café"}\n'.encode("latin-1"))
  with pytest.raises(BankError, match=r"docs.jsonl:2: not UTF-8 text \(invalid continuation "
                                      r"byte: byte 0xe9\)"):
    list(open_corpus(str(path), "jsonl"))


def test_text_files_corpus_is_sorted_one_document_per_file(tmp_path):
  (tmp_path / "b.txt").write_text("second")
  (tmp_path / "a.txt").write_text("first\nline two")
  (tmp_path / "sub").mkdir()
  assert [d.text for d in open_corpus(str(tmp_path), "text")] == ["first\nline two", "second"]
  assert [d.text for d in open_corpus(str(tmp_path / "b*"), "text")] == ["second"]
  (tmp_path / "c.txt").write_bytes(b"fine\n\xff\xfe bad")
  with pytest.raises(BankError, match="c.txt:2: not UTF-8 text"):
    list(open_corpus(str(tmp_path), "text"))
  with pytest.raises(BankError, match="no files"):
    open_corpus(str(tmp_path / "none*"), "text")


def test_official_memory_list_keeps_file_indices_as_ids(tmp_path):
  path = tmp_path / "mdata.json"
  path.write_text(json.dumps(["doc zero", "", "doc two"]))
  assert open_corpus(str(path), "official_json") == [
      Document("doc zero", 0), Document("", 1), Document("doc two", 2)]
  pkl = tmp_path / "mdata.pkl"
  pkl.write_bytes(pickle.dumps(["x", "y"]))
  with pytest.raises(BankError, match="is a pickle.*--allow_pickle"):
    open_corpus(str(pkl), "official_json")
  assert [d.display_id for d in open_corpus(str(pkl), "official_json", allow_pickle=True)] == [0, 1]
  path.write_text(json.dumps({"not": "a list"}))
  with pytest.raises(BankError, match="expected a list"):
    open_corpus(str(path), "official_json")


def test_missing_and_empty_corpora(tmp_path):
  with pytest.raises(BankError, match="does not exist"):
    open_corpus(str(tmp_path / "nope.jsonl"), "jsonl")
  with pytest.raises(BankError, match="does not exist"):
    open_corpus(str(tmp_path / "nope.json"), "official_json")
  (tmp_path / "empty.jsonl").write_text("\n\n")
  with pytest.raises(BankError, match="has no documents"):
    open_corpus(str(tmp_path / "empty.jsonl"), "jsonl")
  (tmp_path / "empty.json").write_text("[]")
  with pytest.raises(BankError, match="no documents"):
    open_corpus(str(tmp_path / "empty.json"), "official_json")
  with pytest.raises(BankError, match="unknown corpus format"):
    open_corpus(str(tmp_path / "empty.json"), "csv")
