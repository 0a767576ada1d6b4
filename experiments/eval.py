"""Evaluates Memory Interleave on a query file against a memory bank: answer exact match and token
F1, retrieval precision/recall/F1 of the ids the model wrote against the gold ids, and optionally
an LLM judge's 0-5 score (MSA_PAPER.md App. A) through an OpenAI-compatible endpoint. Writes
results.json (every question with its rounds) and summary.txt (the table it prints) to --out.

Answers are written to --out/generations.jsonl as they finish and judgements, after every
question is answered, to judgements.jsonl; killed, or with the judge failing, the same command run
again resumes: it answers only the questions left and retries the failed judgements.

  python experiments/eval.py --checkpoint=models/tiny_msa --bank=/tmp/bank \
      --queries=/tmp/queries.jsonl --out=/tmp/eval
  python experiments/eval.py ... --queries=qdata.json --memory_file=mdata.json   # official files
  OPENROUTER_API_KEY=... python experiments/eval.py ... --judge_url=https://openrouter.ai/api/v1 \
      --judge_model=google/gemini-2.5-flash --judge_api_key_env=OPENROUTER_API_KEY
"""

import dataclasses
import json
import os

from absl import app, flags

import msa_jax
from msa_jax.atomic_dir import atomic_write_text
from msa_jax.cli import quiet_library_logs, run
from msa_jax.evaluation import evaluate_interleave
from msa_jax.inference.flags import define_serving_flags
from msa_jax.inference.judge import Judge, JudgeError
from msa_jax.inference.metrics import format_table
from msa_jax.inference.queries import check_against_memory, read_queries
from msa_jax.inference.serving import open_server
from msa_jax.jsonl_log import JsonlLog

_SERVING = define_serving_flags()
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
_OUT = flags.DEFINE_string("out", None, "Output directory (results.json, summary.txt; "
                           "generations.jsonl, judgements.jsonl to resume from).", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Start over, discarding the answers and "
                               "judgements of an earlier run in --out.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Questions answered together.")
_JUDGE_URL = flags.DEFINE_string("judge_url", None, "OpenAI-compatible endpoint of an LLM judge "
                                 "(e.g. https://openrouter.ai/api/v1); off when unset.")
_JUDGE_MODEL = flags.DEFINE_string("judge_model", None, "The judge's model name.")
_JUDGE_KEY_ENV = flags.DEFINE_string("judge_api_key_env", "OPENAI_API_KEY", "Environment variable "
                                     "holding the judge's API key (never logged).")
_GENERATIONS, _JUDGEMENTS, _RESULTS, _SUMMARY = (
    "generations.jsonl", "judgements.jsonl", "results.json", "summary.txt")
_FILES = (_GENERATIONS, _JUDGEMENTS, _RESULTS, _SUMMARY)


def _check_output_dir(path: str) -> None:
  """--out must be new, empty, or an earlier evaluation's (resumed; --overwrite starts over)."""
  if os.path.lexists(path) and not os.path.isdir(path):
    raise ValueError(f"--out {path} is a file; give a directory")
  others = sorted(n for n in os.listdir(path) if n not in _FILES and not n.startswith(".")
                  ) if os.path.isdir(path) else []
  if others:
    raise ValueError(f"--out {path} holds other files ({', '.join(others[:3])}), not an "
                     f"evaluation's; choose a new directory")


def main(argv):
  del argv
  quiet_library_logs()
  if bool(_JUDGE_URL.value) != bool(_JUDGE_MODEL.value):
    raise app.UsageError("the judge needs both --judge_url and --judge_model")
  config = _SERVING.interleave_config()
  judge = (Judge(_JUDGE_URL.value, _JUDGE_MODEL.value, api_key_env=_JUDGE_KEY_ENV.value)
           if _JUDGE_URL.value else None)
  _check_output_dir(_OUT.value)
  settings = {"checkpoint": os.path.abspath(_CHECKPOINT.value),
              "bank": os.path.abspath(_BANK.value), "queries": os.path.abspath(_QUERIES.value),
              "memory_file": _MEMORY_FILE.value and os.path.abspath(_MEMORY_FILE.value),
              "interleave": dataclasses.asdict(config)}
  generations = JsonlLog(os.path.join(_OUT.value, _GENERATIONS), settings)
  judgements = JsonlLog(os.path.join(_OUT.value, _JUDGEMENTS), {"judge_model": _JUDGE_MODEL.value})
  if not _OVERWRITE.value:  # an earlier run under other settings is refused now, not after loading
    generations.read()
    judgements.read()
  queries = read_queries(_QUERIES.value, memory_file=_MEMORY_FILE.value,
                         allow_pickle=_ALLOW_PICKLE.value)
  loaded = msa_jax.load(_CHECKPOINT.value, **_SERVING.load_overrides())
  server = open_server(loaded, _BANK.value, **_SERVING.server_kwargs())
  check_against_memory(queries, server.bank)
  os.makedirs(_OUT.value, exist_ok=True)
  for name in _FILES if _OVERWRITE.value else ():
    if os.path.exists(os.path.join(_OUT.value, name)):
      os.remove(os.path.join(_OUT.value, name))
  result = evaluate_interleave(server.driver(config), queries, batch_size=_BATCH.value,
                               judge=judge, generations=generations, judgements=judgements)
  table = format_table(result["summary"])
  print(table)
  result["settings"] = {**settings, "judge_model": _JUDGE_MODEL.value}
  atomic_write_text(os.path.join(_OUT.value, _RESULTS), json.dumps(result, indent=1))
  atomic_write_text(os.path.join(_OUT.value, _SUMMARY), table + "\n")
  print(f"wrote {_OUT.value}/results.json and summary.txt")
  failed = result["summary"]["all"].get("judge_failed", 0)
  if failed:
    raise JudgeError(f"{failed} of {len(queries)} judgements failed (recorded in results.json); "
                     f"run the same command again to retry them")


if __name__ == "__main__":
  run(main)
