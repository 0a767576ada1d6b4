"""One writer per bank: while a writer (another process) holds a bank, a second writer is refused
with an error naming it and cuts none of its in-flight rows, and readers cut none either; once the
first writer is killed, the next one takes over its lock (saying so) and resumes its append."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

import msa_jax
from msa_jax.memory import BankError, open_bank, store
from msa_jax.memory.encode import encode_corpus
from msa_jax.memory.lock import BankLock, lock_path
from tests.bank_writer_worker import ENCODE

ROOT = os.path.join(os.path.dirname(__file__), "..")
MORE = ["cloud fire water", "delta " * 30, "river stone", "moon moon"]


def _shapes(bank):
  return {name: store.open_array(str(bank), name).shape for name in store.ALL_ARRAYS}


def test_lock_refuses_a_second_holder_and_takes_over_a_dead_ones(tmp_path):
  bank = tmp_path / "bank"
  logs = []
  with BankLock(str(bank), logs.append):
    command = re.escape(" ".join(sys.argv)[:300])  # what the lock records of this process
    with pytest.raises(BankError, match=rf"being written by pid {os.getpid()} on host .*{command}"):
      BankLock(str(bank)).__enter__()
  assert not os.path.exists(lock_path(str(bank))) and not logs  # a clean release leaves nothing
  with open(lock_path(str(bank)), "w") as f:  # what a killed holder leaves
    json.dump({"pid": 999999, "host": "elsewhere", "since": "then", "command": "encode"}, f)
  with BankLock(str(bank), logs.append):
    pass
  assert logs == [f"bank {bank}: taking over the write lock of pid 999999 on host elsewhere "
                  f"(since then: encode), which ended without releasing it"]


def test_two_writer_processes_on_one_bank(tmp_path):
  loaded = msa_jax.load(os.path.join(ROOT, "models", "tiny_msa"))
  encode = lambda docs, **kw: encode_corpus(loaded.model, loaded.params, loaded.tokenizer, docs,
                                            str(bank), **(ENCODE | kw))
  bank = tmp_path / "bank"
  encode(["alpha beta", "moon river", "stone"])
  corpus = tmp_path / "more.jsonl"
  corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in MORE))
  marker = tmp_path / "stalled"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  worker = subprocess.Popen([sys.executable, "-m", "tests.bank_writer_worker", str(bank),
                             str(corpus), str(marker)], cwd=ROOT, env=env)
  try:
    deadline = time.time() + 300
    while not marker.exists():
      assert worker.poll() is None and time.time() < deadline, "the worker did not stall"
      time.sleep(0.2)
    in_flight = _shapes(bank)
    assert in_flight["display_ids"][0] > 3  # its first batch is written, not committed
    with pytest.raises(BankError, match=rf"being written by pid {worker.pid} on host .*"
                                        rf"bank_writer_worker"):
      encode(["cloud"], append=True)
    assert open_bank(str(bank), allow_incomplete=True).num_docs == 3
    assert _shapes(bank) == in_flight  # neither the refused writer nor the reader cut its rows
  finally:
    worker.kill()
    worker.wait()
  logs = []
  stats = encode(MORE, append=True, log=logs.append)  # the killed append, resumed
  assert any(f"taking over the write lock of pid {worker.pid}" in line for line in logs)
  assert stats.bank_documents == 7
  assert [open_bank(str(bank)).document_text(i) for i in range(3, 7)] == MORE
  assert not os.path.exists(lock_path(str(bank)))
