"""The bank binaries end to end on the shipped tiny model: encode an official memory list, append
text files, inspect with full verification; a bad corpus exits with a clear message."""

import json
import os

import numpy as np

from msa_jax.memory import open_bank
from tests.binary_runner import run_python

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return run_python(args, cwd=ROOT, env=env, timeout=300)


def test_encode_append_and_inspect_on_the_tiny_model(tmp_path):
  memory = tmp_path / "mdata.json"
  memory.write_text(json.dumps(["alpha beta gamma", "river stone " * 20, "moon"]))
  texts = tmp_path / "texts"
  texts.mkdir()
  (texts / "a.txt").write_text("cloud fire water")
  (texts / "b.txt").write_text("delta " * 30)
  bank = tmp_path / "bank"
  common = ["--checkpoint=models/tiny_msa", f"--out={bank}", "--row_tokens=128", "--batch_rows=2"]
  run = _run("experiments/encode_memory.py", *common, f"--corpus={memory}",
             "--format=official_json", f"--stats_json={tmp_path / 'stats.json'}")
  assert run.returncode == 0, run.stderr
  assert "encoded 3 documents" in run.stdout
  assert "3/3 documents (100.0%)" in run.stdout and "tokens/s" in run.stdout
  stats = json.loads((tmp_path / "stats.json").read_text())
  assert stats["documents"] == 3 and stats["tokens"] > 0 and stats["tokens_per_second"] > 0
  run = _run("experiments/encode_memory.py", *common, f"--corpus={texts}", "--format=text",
             "--append")
  assert run.returncode == 0, run.stderr
  assert "holds 5 documents" in run.stdout
  b = open_bank(str(bank))
  assert b.display_ids.tolist() == [0, 1, 2, 3, 4]
  assert b.document_text(4) == "delta " * 30
  assert np.all(np.diff(b.doc_chunk_offsets) > 0)
  run = _run("tools/inspect_bank.py", f"--bank={bank}", "--verify", "--docs=2")
  assert run.returncode == 0, run.stderr
  assert "5 documents" in run.stdout and "router layers [3, 4, 5]" in run.stdout
  assert "router_keys        (3, " in run.stdout
  assert "doc 1 [id 1] chunks" in run.stdout and "verified" in run.stdout


def test_bad_corpus_exits_with_a_clear_message(tmp_path):
  corpus = tmp_path / "docs.jsonl"
  corpus.write_text('{"text": "ok"}\n{"text": 5}\n')
  run = _run("experiments/encode_memory.py", "--checkpoint=models/tiny_msa",
             f"--corpus={corpus}", f"--out={tmp_path / 'bank'}")
  assert run.returncode == 1
  assert "docs.jsonl:2: expected an object with a string 'text'" in run.stderr
  assert "Traceback" not in run.stderr
  assert not os.path.exists(tmp_path / "bank")
  run = _run("tools/inspect_bank.py", f"--bank={tmp_path / 'bank'}")
  assert run.returncode == 1 and "no bank at" in run.stderr
