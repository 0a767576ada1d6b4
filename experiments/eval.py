"""Evaluates Memory Interleave on a query file against a memory bank: answer exact match and token
F1, retrieval precision/recall/F1 of the ids the model wrote against the gold ids, and optionally
an LLM judge's 0-5 score (MSA_PAPER.md App. A) through an OpenAI-compatible endpoint. Writes
results.json (every question with its rounds) and summary.txt (the table it prints) to --out.

  python experiments/eval.py --checkpoint=models/tiny_msa --bank=/tmp/bank \
      --queries=/tmp/queries.jsonl --out=/tmp/eval
  python experiments/eval.py ... --queries=qdata.json --memory_file=mdata.json   # official files
  OPENROUTER_API_KEY=... python experiments/eval.py ... --judge_url=https://openrouter.ai/api/v1 \
      --judge_model=google/gemini-2.5-flash --judge_api_key_env=OPENROUTER_API_KEY
"""

import dataclasses
import json
import os
import sys

from absl import app, flags

import msa_jax
from msa_jax.atomic_dir import atomic_output_dir
from msa_jax.cli import quiet_library_logs
from msa_jax.inference import flags as serving_flags
from msa_jax.inference.judge import Judge, JudgeError
from msa_jax.inference.metrics import format_table
from msa_jax.inference.qa_eval import evaluate
from msa_jax.inference.queries import check_against_memory, read_queries
from msa_jax.inference.serving import open_server

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint directory.", required=True)
_BANK = flags.DEFINE_string("bank", None, "Memory bank encoded from the queries' corpus.",
                            required=True)
_QUERIES = flags.DEFINE_string("queries", None, "Query file: our JSONL records (.jsonl) or an "
                               "official query file (.json; .pkl with --allow_pickle).",
                               required=True)
_MEMORY_FILE = flags.DEFINE_string("memory_file", None, "Official query files: the memory file "
                                   "they were written for (the bank's corpus).")
_ALLOW_PICKLE = flags.DEFINE_bool("allow_pickle", False, "Allow pickled official files "
                                  "(unpickling runs code from the file: only for trusted files).")
_OUT = flags.DEFINE_string("out", None, "Output directory (results.json, summary.txt).",
                           required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out directory.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Questions answered together.")
_JUDGE_URL = flags.DEFINE_string("judge_url", None, "OpenAI-compatible endpoint of an LLM judge "
                                 "(e.g. https://openrouter.ai/api/v1); off when unset.")
_JUDGE_MODEL = flags.DEFINE_string("judge_model", None, "The judge's model name.")
_JUDGE_KEY_ENV = flags.DEFINE_string("judge_api_key_env", "OPENAI_API_KEY", "Environment variable "
                                     "holding the judge's API key (never logged).")


def main(argv):
  del argv
  quiet_library_logs()
  if bool(_JUDGE_URL.value) != bool(_JUDGE_MODEL.value):
    raise app.UsageError("the judge needs both --judge_url and --judge_model")
  if os.path.lexists(_OUT.value) and not _OVERWRITE.value:
    raise app.UsageError(f"{_OUT.value} exists; pass --overwrite to replace it")
  try:
    config = serving_flags.interleave_config()
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  judge = (Judge(_JUDGE_URL.value, _JUDGE_MODEL.value, api_key_env=_JUDGE_KEY_ENV.value)
           if _JUDGE_URL.value else None)
  try:
    queries = read_queries(_QUERIES.value, memory_file=_MEMORY_FILE.value,
                           allow_pickle=_ALLOW_PICKLE.value)
    loaded = msa_jax.load(_CHECKPOINT.value)
    server = open_server(loaded, _BANK.value, **serving_flags.server_kwargs())
    check_against_memory(queries, server.bank)
    result = evaluate(server.driver(config), queries, batch_size=_BATCH.value, judge=judge)
  except (ValueError, JudgeError) as e:  # bad input (files, bank, model) or the judge failing
    sys.exit(f"eval: {e}")
  table = format_table(result["summary"])
  print(table)
  result["settings"] = {"checkpoint": _CHECKPOINT.value, "bank": _BANK.value,
                        "queries": _QUERIES.value, "interleave": dataclasses.asdict(config),
                        "judge_model": _JUDGE_MODEL.value}
  with atomic_output_dir(_OUT.value, overwrite=_OVERWRITE.value) as tmp:
    with open(os.path.join(tmp, "results.json"), "w") as f:
      json.dump(result, f, indent=1)
    with open(os.path.join(tmp, "summary.txt"), "w") as f:
      f.write(table + "\n")
  print(f"wrote {_OUT.value}/results.json and summary.txt")


if __name__ == "__main__":
  app.run(main)
