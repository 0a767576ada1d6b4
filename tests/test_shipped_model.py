"""The shipped tiny model (models/tiny_msa) loads, matches its recorded training config, and runs the
generative-retrieval evaluation end to end on a small memory."""

import json
import os

import pytest

import msa_jax
from msa_jax.data.synthetic import generate
from msa_jax.jsonl_log import JsonlLog
from msa_jax.training.eval_memory_qa import EvalShapes, evaluate, parse_answer, parse_ids
from msa_jax.training.model_setup import model_configs
from msa_jax.training.train_config import config_from_dict, config_to_dict

ROOT = os.path.join(os.path.dirname(__file__), "..")
MODEL = os.path.join(ROOT, "models", "tiny_msa")


def test_shipped_model_matches_its_config_and_evaluates():
  loaded = msa_jax.load(MODEL)
  with open(os.path.join(ROOT, "experiments", "configs", "tiny_msa.json")) as f:
    recorded = config_from_dict(json.load(f))
  model_cfg, msa_cfg = model_configs(recorded.model, loaded.tokenizer.vocab_size)
  assert loaded.model_config == model_cfg and loaded.msa_config == msa_cfg
  with open(os.path.join(MODEL, "train_config.json")) as f:
    shipped = config_from_dict(json.load(f))
  assert config_to_dict(shipped) == config_to_dict(recorded)  # the shipped model is this run
  tok = loaded.tokenizer
  records = [generate("fact_lookup", 1000, i, memory_tokens=1024, max_doc_tokens=96,
                      length_fn=lambda t: len(tok.encode(t))) for i in range(2)]
  result = evaluate(loaded.model, loaded.params, tok, records,
                    EvalShapes(seq_len_mem=1024, max_docs=64, seq_len_prompt=256,
                               max_new_tokens=6), batch_size=2)
  summary = result["summary"]
  assert summary["records"] == 2
  for key, value in summary.items():
    if key != "records":
      assert 0.0 <= value <= 1.0, key
  for rec in result["records"]:  # recall@16 over <= 16 documents is 1 by definition
    n_docs = len(records[result["records"].index(rec)].documents)
    if n_docs <= 16:
      assert rec["recall@16/layer5"] == 1.0
    assert rec["pred_ids"] == list(parse_ids(rec["written"]))


def test_evaluation_killed_midway_resumes_from_its_log(tmp_path):
  loaded = msa_jax.load(MODEL)
  tok = loaded.tokenizer
  records = [generate("fact_lookup", 1000, i, memory_tokens=512, max_doc_tokens=96,
                      length_fn=lambda t: len(tok.encode(t))) for i in range(2)]
  shapes = EvalShapes(seq_len_mem=512, max_docs=32, seq_len_prompt=256, max_new_tokens=4)
  run = lambda **kw: evaluate(loaded.model, loaded.params, tok, records, shapes, **kw)
  want = run()
  log = JsonlLog(str(tmp_path / "progress.jsonl"), {"seed": 1000})

  def killed(done, total):
    raise KeyboardInterrupt("killed after the first record")

  with pytest.raises(KeyboardInterrupt):
    run(record_log=log, progress=killed)
  assert [r["index"] for r in log.read()] == [0]
  seen = []
  got = run(record_log=log, progress=lambda done, total: seen.append(done))
  assert seen == [2]  # only the second record was evaluated
  assert got == want


def test_parsers():
  assert parse_ids("[12][3]<|object_ref_end|>[12]") == (12, 3)
  assert parse_ids("no ids") == ()
  assert parse_answer("x The answer to the question is: May 5<|im_end|>") == "May 5"
  assert parse_answer("The answer to the question is: a The answer to the question is: b") == "b"
  assert parse_answer("nothing") == ""
