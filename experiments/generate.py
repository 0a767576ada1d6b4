"""Answers questions over a memory bank with Memory Interleave, printing the ids retrieved in each
round and the answer; or, without a bank, continues a plain prompt with the backbone.

  python experiments/generate.py --checkpoint=models/tiny_msa --bank=/tmp/bank \
      --question="What is the food of Vamoel Fambow?" --question="..."
  python experiments/generate.py --checkpoint=models/tiny_msa --bank=/tmp/bank \
      --questions_file=questions.txt --out=/tmp/answers.json     # one question per line, or JSONL
  python experiments/generate.py --checkpoint=/tmp/qwen3 --prompt="Hello" --max_new_tokens=8
"""

import json

from absl import app, flags

import msa_jax
from msa_jax.atomic_dir import atomic_write_text
from msa_jax.cli import quiet_library_logs, run
from msa_jax.data.records import RecordError
from msa_jax.inference.flags import define_serving_flags
from msa_jax.inference.engine import Engine
from msa_jax.inference.queries import read_queries
from msa_jax.inference.requests import Request
from msa_jax.inference.serving import open_server
from msa_jax.text_files import utf8_lines

_SERVING = define_serving_flags()
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint directory.", required=True)
_BANK = flags.DEFINE_string("bank", None, "Memory bank (experiments/encode_memory.py) to ask.")
_QUESTION = flags.DEFINE_multi_string("question", [], "A question (repeat for several).")
_QUESTIONS_FILE = flags.DEFINE_string("questions_file", None, "Questions: a text file, one per "
                                      "line, or our JSONL records (.jsonl).")
_OUT = flags.DEFINE_string("out", None, "Also write every answer with its rounds as JSON here.")
_PROMPT = flags.DEFINE_string("prompt", None, "Without a bank: a plain prompt to continue.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 16, "Plain prompt: tokens to generate.")


def _questions() -> list[str]:
  """The questions of the flags, checked before the model loads."""
  for n, question in enumerate(_QUESTION.value):
    if not question.strip():
      raise ValueError(f"--question number {n + 1} is empty")
  questions = list(_QUESTION.value)
  path = _QUESTIONS_FILE.value
  if path:
    if path.lower().endswith(".jsonl"):
      questions += [q.question for q in read_queries(path)]
    else:
      questions += [line.strip() for _, line in utf8_lines(path, RecordError) if line.strip()]
      if not questions:
        raise RecordError(f"{path}: no questions (the file is empty)")
  if not questions:
    raise app.UsageError("no questions: pass --question or --questions_file")
  return questions


def _plain(loaded) -> None:
  """Greedy continuation of --prompt by the backbone (no memory), through the engine."""
  prompt_ids = loaded.tokenizer.encode(_PROMPT.value)
  engine = Engine(loaded.model, loaded.params, backbone=True, max_batch=1)
  request = Request(prompt_ids, [False] * len(prompt_ids), _MAX_NEW_TOKENS.value,
                    stop_ids=(loaded.tokenizer.im_end_id,))
  new_ids = engine.generate([request])[0].tokens
  print(f"prompt ids: {prompt_ids}")
  print(f"generated ids: {new_ids}")
  print(f"generated text: {loaded.tokenizer.decode(new_ids)!r}")


def main(argv):
  del argv
  quiet_library_logs()
  if not _BANK.value:
    if _QUESTION.value or _QUESTIONS_FILE.value:
      raise app.UsageError("questions need a memory: pass --bank (without one, --prompt "
                           "continues a plain prompt)")
    if _PROMPT.value is None:
      raise app.UsageError("pass --bank with --question/--questions_file, or --prompt")
  elif _PROMPT.value is not None:
    raise app.UsageError("--prompt is for generation without a bank; ask --question instead")
  config = _SERVING.interleave_config()
  questions = _questions() if _BANK.value else []
  loaded = msa_jax.load(_CHECKPOINT.value, **_SERVING.load_overrides())
  if loaded.tokenizer is None:
    raise ValueError(f"{_CHECKPOINT.value} has no tokenizer.json")
  if not _BANK.value:
    _plain(loaded)
    return
  server = open_server(loaded, _BANK.value, **_SERVING.server_kwargs())
  results = server.driver(config).run(questions)
  for n, result in enumerate(results):
    print(f"Q{n}: {result.question}")
    for r in result.rounds:
      if r.phase == "retrieve":
        unknown = f"  (unknown, ignored: {r.unknown_ids})" if r.unknown_ids else ""
        print(f"  round {r.round}: ids {r.ids}{unknown}  text {r.text!r}")
    print(f"  answer: {result.answer!r}  ({result.status})")
  if _OUT.value:
    atomic_write_text(_OUT.value, json.dumps([r.to_json() for r in results], indent=1))
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  run(main)
