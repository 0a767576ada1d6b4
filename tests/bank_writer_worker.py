"""The first of two writers of `tests/test_bank_lock.py`: appends a corpus to a bank with the
shipped tiny model and stalls inside the commit of its first batch (rows written, manifest not yet
replaced), holding the bank's lock, until it is killed.

  python -m tests.bank_writer_worker BANK CORPUS MARKER
"""

import sys
import time

import msa_jax
from msa_jax.memory import manifest as mf
from msa_jax.memory.corpus import JsonlCorpus
from msa_jax.memory.encode import encode_corpus

ENCODE = dict(row_tokens=128, batch_rows=1, log=lambda s: None)


def main(bank: str, corpus: str, marker: str) -> None:
  loaded = msa_jax.load("models/tiny_msa")
  write = mf.write_manifest
  calls = []

  def stall(path, manifest):
    calls.append(path)
    if len(calls) == 2:  # 1: the append's session; 2: the commit of its first batch
      open(marker, "w").close()
      time.sleep(600)
    write(path, manifest)

  mf.write_manifest = stall
  encode_corpus(loaded.model, loaded.params, loaded.tokenizer, JsonlCorpus(corpus), bank,
                append=True, **ENCODE)


if __name__ == "__main__":
  main(*sys.argv[1:])
