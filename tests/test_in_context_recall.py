"""The in-context recall diagnosis: its samples score exactly what they claim, and a short run on
CPU writes its curve."""

import json
import os

import numpy as np
import pytest

from msa_jax.data.synthetic import tasks
from msa_jax.data.synthetic.world_tokenizer import world_tokenizer
from msa_jax.training.in_context_recall import RecallSettings, make_batch, recall_sample
from tests.binary_runner import run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("dense", [False, True])
def test_labels_score_the_answer_or_every_next_token(dense):
  tok = world_tokenizer()
  s = RecallSettings(num_docs=3, max_doc_tokens=48, seq_len=256, dense=dense)
  record = tasks.fact_lookup(7, 5, memory_tokens=1 << 30, min_doc_tokens=16, max_doc_tokens=48,
                             max_docs=3)
  x = recall_sample(tok, 7, 5, s)
  text = tok.decode(x.tokens)
  assert text.endswith(f"{record.question}\nThe answer to the question is: {record.answer}")
  assert len(record.documents) == 3 and all(d in text for d in record.documents)
  answer = tok.encode(" " + record.answer)
  scored = [p for p, l in enumerate(x.labels) if l >= 0]
  for p in scored:  # every label is the next token
    assert x.labels[p] == x.tokens[p + 1]
  expected = range(len(x.tokens) - 1) if dense else range(len(x.tokens) - 1 - len(answer),
                                                          len(x.tokens) - 1)
  assert scored == list(expected)
  assert x.tokens[x.answer_at + 1] == answer[0]


def test_batch_pads_and_marks_tokens():
  tok = world_tokenizer()
  s = RecallSettings(seq_len=128, max_doc_tokens=32)
  tokens, labels, segments, answer_at = make_batch(tok, 0, 10, 4, s)
  for b in range(4):
    x = recall_sample(tok, 0, 10 + b, s)
    n = len(x.tokens)
    np.testing.assert_array_equal(tokens[b, :n], x.tokens)
    assert segments[b, :n].all() and not segments[b, n:].any() and (labels[b, n:] == -1).all()
    assert answer_at[b] == x.answer_at


def test_too_long_sample_is_refused():
  with pytest.raises(ValueError, match="more than seq_len=16"):
    recall_sample(world_tokenizer(), 0, 0, RecallSettings(seq_len=16))


def test_binary_writes_curve(tmp_path):
  out = tmp_path / "recall"
  cmd = [os.path.join(ROOT, "experiments", "in_context_recall.py"),
         "--hidden_size=32", "--num_layers=1", "--steps=2", "--batch_size=2", "--eval_every=1",
         "--eval_size=2", "--seq_len=128", "--max_doc_tokens=32", f"--out={out}"]
  run = run_python(cmd, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads((out / "recall.json").read_text())
  assert report["steps"] == [1, 2] and len(report["heldout_accuracy"]) == 2
  assert all(0.0 <= a <= 1.0 for a in report["heldout_accuracy"])
  assert (out / "recall.png").stat().st_size > 0
  bad = run_python(cmd[:1] + ["--steps=0"], timeout=120)
  assert bad.returncode != 0 and "steps must be positive" in bad.stderr
