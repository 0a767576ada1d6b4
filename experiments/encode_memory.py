"""Encodes a corpus into a memory bank (resumable; --append adds documents to a finished bank).

  python experiments/encode_memory.py --checkpoint=models/tiny_msa --corpus=docs.jsonl \
      --format=jsonl --out=/tmp/bank
  python experiments/encode_memory.py ... --append --corpus=more.jsonl   # add documents
  # killed? run the same command again: it continues after the last committed batch
"""

import json

from absl import flags

import msa_jax
from msa_jax.atomic_dir import atomic_write_text
from msa_jax.cli import quiet_library_logs, run
from msa_jax.data.tokenizer import Tokenizer
from msa_jax.memory.corpus import FORMATS, open_corpus
from msa_jax.memory.encode import encode_corpus
from msa_jax.memory.errors import BankError
from msa_jax.memory.writer import DEFAULT_ROWS_PER_CHUNK
from msa_jax.model.router_keys import KEY_DTYPES

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "msa_jax checkpoint (or Hugging Face MSA "
                                  "directory).", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json (default: the checkpoint's).")
_CORPUS = flags.DEFINE_string("corpus", None, "The corpus: a JSONL file, a directory or glob of "
                              "text files, or an official memory JSON list.", required=True)
_FORMAT = flags.DEFINE_enum("format", "jsonl", list(FORMATS), "Corpus format.")
_OUT = flags.DEFINE_string("out", None, "The bank directory.", required=True)
_APPEND = flags.DEFINE_bool("append", False, "Add the corpus to the finished bank at --out.")
_ROW_TOKENS = flags.DEFINE_integer("row_tokens", 4096, "Tokens per packed row (the longest "
                                   "wrapped document must fit).")
_BATCH_ROWS = flags.DEFINE_integer("batch_rows", 8, "Rows per encoded batch.")
_MAX_DOCS = flags.DEFINE_integer("max_docs_per_row", None, "Documents per row at most "
                                 "(default row_tokens // chunk_size).")
_ROWS_PER_CHUNK = flags.DEFINE_integer("rows_per_chunk", DEFAULT_ROWS_PER_CHUNK,
                                       "Chunk rows per zarr storage chunk.")
_ALLOW_PICKLE = flags.DEFINE_bool("allow_pickle", False, "Allow a pickled official memory file "
                                  "(unpickling runs code from the file: only for trusted files).")
_KEY_DTYPE = flags.DEFINE_enum("router_key_dtype", None, list(KEY_DTYPES), "How a new bank stores "
                                "its router keys (default bfloat16; int8 adds per-chunk, per-head "
                                "scales). A resume or append keeps the bank's.")
_COMPUTE_DTYPE = flags.DEFINE_string("compute_dtype", None, "Override the compute dtype.")
_STATS = flags.DEFINE_string("stats_json", None, "Also write the encode statistics here.")


def main(argv):
  del argv
  quiet_library_logs()
  corpus = open_corpus(_CORPUS.value, _FORMAT.value, allow_pickle=_ALLOW_PICKLE.value)
  loaded = msa_jax.load(_CHECKPOINT.value, compute_dtype=_COMPUTE_DTYPE.value)
  tokenizer = Tokenizer.from_file(_TOKENIZER.value) if _TOKENIZER.value else loaded.tokenizer
  if tokenizer is None:
    raise BankError(f"{_CHECKPOINT.value} has no tokenizer.json; pass --tokenizer")
  stats = encode_corpus(loaded.model, loaded.params, tokenizer, corpus, _OUT.value,
                        batch_rows=_BATCH_ROWS.value, row_tokens=_ROW_TOKENS.value,
                        max_docs_per_row=_MAX_DOCS.value, append=_APPEND.value,
                        rows_per_chunk=_ROWS_PER_CHUNK.value,
                        router_key_dtype=_KEY_DTYPE.value)
  print(f"encoded {stats.documents} documents ({stats.tokens} tokens, {stats.chunks} chunks) in "
        f"{stats.seconds:.1f} s, {stats.tokens_per_second:,.0f} tokens/s; the bank at "
        f"{stats.path} holds {stats.bank_documents} documents")
  if _STATS.value:
    atomic_write_text(_STATS.value, json.dumps(stats.to_json(), indent=1))


if __name__ == "__main__":
  run(main)
