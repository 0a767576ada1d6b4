"""Every binary reports the errors a user can fix as one line `<binary>: <problem>` and exit status
1, never a traceback: damaged checkpoints, files that are not UTF-8, --out that is a file or
another directory, an unknown score mode in a bank, a misspelt task, an empty question (refused
before the model loads)."""

import json
import os
import shutil

import numpy as np
import pytest

import msa_jax
from msa_jax.checkpoint.errors import CheckpointError
from msa_jax.memory import manifest as mf
from msa_jax.memory.encode import encode_corpus
from msa_jax.training.checkpointing import TrainCheckpoints
from tests.binary_runner import run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "models", "tiny_msa")


def _error_line(script, *args):
  """The one line a failing binary printed (asserting there is no traceback)."""
  result = run_python([os.path.join(ROOT, script), *args], cwd=ROOT, timeout=300,
                      env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  name = os.path.splitext(os.path.basename(script))[0]
  lines = [l for l in result.stderr.splitlines() if l.startswith(f"{name}: ")]
  assert len(lines) == 1, result.stderr[-3000:]
  return lines[0]


def _truncate_largest(directory):
  files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    f.truncate(1000)


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
  loaded = msa_jax.load(TINY)
  path = str(tmp_path_factory.mktemp("bank") / "bank")
  encode_corpus(loaded.model, loaded.params, loaded.tokenizer, ["alpha beta", "moon river"], path,
                row_tokens=128, batch_rows=1, log=lambda s: None)
  return path


def test_a_truncated_checkpoint(tmp_path):
  ckpt = tmp_path / "ckpt"
  shutil.copytree(TINY, ckpt)
  _truncate_largest(ckpt / "params")
  line = _error_line("experiments/generate.py", f"--checkpoint={ckpt}", "--prompt=hi")
  assert line.startswith(f"generate: cannot restore {ckpt}/params: it is damaged or incomplete (")
  assert "tensorstore_spec" not in line and len(line) < 400


def test_a_truncated_training_checkpoint(tmp_path):
  ckpts = TrainCheckpoints(str(tmp_path / "checkpoints"))
  state = {"w": np.arange(50_000, dtype=np.float32)}
  ckpts.save(7, state, {"phase": 0})
  _truncate_largest(tmp_path / "checkpoints" / "7")
  with pytest.raises(CheckpointError, match=rf"cannot restore the checkpoint of step 7 in "
                                            rf"{tmp_path}/checkpoints: it is damaged or "
                                            rf"incomplete \(.*\); remove {tmp_path}/checkpoints/7 "
                                            rf"to resume from the one before"):
    ckpts.restore_state(7, state)
  ckpts.close()


def test_encode_into_a_file_a_directory_or_from_latin1(bank, tmp_path):
  corpus = tmp_path / "docs.jsonl"
  corpus.write_bytes('{"text": "fine"}\n{"text": "café"}\n'.encode("latin-1"))
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  common = ["experiments/encode_memory.py", f"--checkpoint={TINY}", f"--corpus={corpus}"]
  assert _error_line(*common, f"--out={tmp_path / 'new'}") == (
      f"encode_memory: {corpus}:2: not UTF-8 text (invalid continuation byte: byte 0xe9); save "
      f"the file as UTF-8")
  assert _error_line(*common, f"--out={a_file}") == (
      f"encode_memory: {a_file} is a file, not a bank directory; choose another output directory")
  assert _error_line(*common, f"--out={tmp_path}") == (
      f"encode_memory: {tmp_path} is a directory but not a bank (it has no manifest.json); "
      f"choose a new or empty output directory")


def test_inspect_a_bank_with_an_unknown_score_mode(bank, tmp_path):
  copy = tmp_path / "bank"
  shutil.copytree(bank, copy)
  with open(copy / "manifest.json") as f:
    manifest = json.load(f)
  manifest["msa_config"]["score_mode"] = "dot"  # as a later msa_jax might write
  manifest["manifest_sha256"] = mf.content_digest(
      {k: v for k, v in manifest.items() if k != "manifest_sha256"})
  with open(copy / "manifest.json", "w") as f:
    json.dump(manifest, f)
  line = _error_line("tools/inspect_bank.py", f"--bank={copy}")
  assert line.startswith(f"inspect_bank: {copy}/manifest.json: the manifest's model "
                         f"configuration is invalid (MSAConfig.score_mode must be one of")


def test_train_with_a_misspelt_task(tmp_path):
  line = _error_line("experiments/train.py",
                     "--config=experiments/configs/tiny_synthetic_smoke.json",
                     f"--workdir={tmp_path}", '--set=data.tasks={"fact_lookp": 1.0}')
  assert line.startswith("train: data.tasks: unknown synthetic task(s) ['fact_lookp']; known: "
                         "fact_lookup,")
  assert not os.listdir(tmp_path)  # refused before anything was built


def test_questions_are_checked_before_the_model_loads(bank, tmp_path):
  questions = tmp_path / "questions.txt"
  questions.write_bytes("who?\nqué?\n".encode("latin-1"))
  missing = tmp_path / "no_model"  # loading it would fail: the questions fail first
  line = _error_line("experiments/generate.py", f"--checkpoint={missing}", f"--bank={bank}",
                     f"--questions_file={questions}")
  assert line == (f"generate: {questions}:2: not UTF-8 text (invalid continuation byte: byte "
                  f"0xe9); save the file as UTF-8")
  assert _error_line("experiments/generate.py", f"--checkpoint={missing}", f"--bank={bank}",
                     "--question=why?", "--question= ") == "generate: --question number 2 is empty"


def test_eval_into_a_file_or_another_directory(bank, tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  common = ["experiments/eval.py", f"--checkpoint={TINY}", f"--bank={bank}",
            f"--queries={tmp_path / 'q.jsonl'}"]
  assert _error_line(*common, f"--out={a_file}") == (
      f"eval: --out {a_file} is a file; give a directory")
  assert _error_line(*common, f"--out={tmp_path}") == (
      f"eval: --out {tmp_path} holds other files (a_file), not an evaluation's; choose a "
      f"new directory")
