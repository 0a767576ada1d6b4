"""RULER's single needle over a bank (`benchmarks/single_needle.py`): each question's memory is the
haystack plus its own needle only, the haystack is encoded once, and the shipped model finds and
answers single needles."""

import json

import pytest

import msa_jax
from benchmarks import single_needle
from msa_jax.data import prompt_format as pf
from msa_jax.data.synthetic import memory_pool
from msa_jax.data.transcript import document_length_fn
from msa_jax.inference import serving
from msa_jax.memory import encode as encode_lib
from tests.test_shipped_model import MODEL


@pytest.fixture(scope="module")
def loaded():
  return msa_jax.load(MODEL)


def test_each_question_sees_the_haystack_and_its_own_needle(loaded, tmp_path, monkeypatch):
  settings = single_needle.NeedleSettings(memory_tokens=4096, num_needle=3, seed=5)
  encodes, memories = [], []
  encode = encode_lib.encode_corpus

  def counted(*args, **kwargs):
    encodes.append(kwargs.get("append", False))
    return encode(*args, **kwargs)

  open_server = serving.open_server

  def recorded(loaded_model, bank, **kwargs):
    server = open_server(loaded_model, bank, **kwargs)
    memories.append(sorted(int(i) for i in server.bank.display_ids))
    assert loaded_model.msa_config.top_k_docs == 1  # the settings' serving choice
    return server

  monkeypatch.setattr(single_needle, "encode_corpus", counted)
  monkeypatch.setattr(serving, "open_server", recorded)
  result = single_needle.run_single_needle(loaded, settings, str(tmp_path), log=lambda _: None)
  assert encodes == [False, True, True, True]  # the haystack once, then one needle per question
  # the memory the benchmark describes, rebuilt here: the demo's pool and level
  length = document_length_fn(loaded.tokenizer, loaded.msa_config.doc_align_to)
  pool = memory_pool.build_pool(4096, num_single=0, num_multi=0, num_needle=3, seed=5,
                                length_fn=length, min_doc_tokens=16, max_doc_tokens=64,
                                align_to=loaded.msa_config.doc_align_to)
  memory = memory_pool.level(pool, 4096, seed=5, length_fn=length)
  needles = [memory.gold_ids(q)[0] for q in memory.questions]
  haystack = [i for i in memory.display_ids if i not in needles]
  assert [sorted(haystack + [n]) for n in needles] == memories
  assert result["haystack_tokens"] == sum(length(pf.wrap_document(i, memory.texts[i]))
                                          for i in haystack)
  assert [r["gold_ids"] for r in result["records"]] == [[n] for n in needles]
  assert result["summary"]["all"]["n"] == 3
  # the shipped model finds every single needle and answers it
  assert result["summary"]["all"]["exact_match"] == 1.0
  assert result["summary"]["all"]["retrieval_exact"] == 1.0
  assert result["router_top1"] == [3, 3]
  assert not list(tmp_path.iterdir())  # the banks are removed
  json_path, png_path = single_needle.write_report(result, str(tmp_path))
  assert json.loads(open(json_path).read())["records"] == result["records"]
  assert open(png_path, "rb").read().startswith(b"\x89PNG")


def test_no_needles_is_a_clear_error(loaded, tmp_path):
  with pytest.raises(ValueError, match="num_needle must be positive"):
    single_needle.run_single_needle(loaded, single_needle.NeedleSettings(num_needle=0),
                                    str(tmp_path))
