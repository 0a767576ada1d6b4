"""Evaluates a trained model on held-out synthetic memory QA (`evaluation.evaluate_records`): router
recall@n per router layer, the first round's written ids (retrieval metrics) and the answer given
the retrieved text (exact match, token F1).

  python experiments/eval_synthetic.py --checkpoint=models/tiny_msa --task=fact_lookup \
      --memory_tokens=65536 --num_records=100 --seed=1000 --out=/tmp/eval.json

With --out, each question's results are also written to <out>.progress.jsonl as they finish, so
the same command run again after a kill evaluates only the questions left.
"""

import json
import os
import time

from absl import flags

import msa_jax
from msa_jax.atomic_dir import atomic_write_text
from msa_jax.cli import quiet_library_logs, run
from msa_jax.data import prompt_format as pf
from msa_jax.data.synthetic import TASKS, generate
from msa_jax.data.transcript import document_length_fn
from msa_jax.evaluation import EvalShapes, evaluate_records
from msa_jax.inference.metrics import format_table
from msa_jax.jsonl_log import JsonlLog

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Trained msa_jax checkpoint.", required=True)
_TASK = flags.DEFINE_string("task", "fact_lookup", "Synthetic task.")
_MEMORY = flags.DEFINE_integer("memory_tokens", 65536, "Memory tokens per question.")
_NUM = flags.DEFINE_integer("num_records", 100, "Held-out questions.")
_SEED = flags.DEFINE_integer("seed", 1000, "Seed of the held-out records (training used others).")
_MIN_DOC = flags.DEFINE_integer("min_doc_tokens", 16, "Shortest document.")
_MAX_DOC = flags.DEFINE_integer("max_doc_tokens", 1024, "Longest document.")
_MAX_DOCS = flags.DEFINE_integer("max_docs", None, "Most documents in one memory (default: as "
                                 "many as --memory_tokens holds; a smaller cap also shrinks the "
                                 "memory, which the printed size shows).")
_PROMPT = flags.DEFINE_integer("seq_len_prompt", 2048, "Prompt buffer length (holds the retrieved documents' text).")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Questions evaluated together.")
_TOP_K = flags.DEFINE_integer("top_k_docs", None, "Documents each router layer selects (default: "
                              "the model's top_k_docs).", lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "Write the JSON results here.")


def main(argv):
  del argv
  quiet_library_logs()
  if _TASK.value not in TASKS:
    raise ValueError(f"unknown --task {_TASK.value!r}; known: {', '.join(TASKS)}")
  settings = {"checkpoint": os.path.abspath(_CHECKPOINT.value), "task": _TASK.value,
              "memory_tokens": _MEMORY.value, "num_records": _NUM.value, "seed": _SEED.value,
              "doc_tokens": [_MIN_DOC.value, _MAX_DOC.value], "max_docs": _MAX_DOCS.value,
              "seq_len_prompt": _PROMPT.value, "top_k_docs": _TOP_K.value}
  record_log = JsonlLog(f"{_OUT.value}.progress.jsonl", settings) if _OUT.value else None
  if record_log:
    record_log.read()  # a log of other settings is refused now, not after loading
  loaded = msa_jax.load(_CHECKPOINT.value, top_k_docs=_TOP_K.value)
  tokenizer = loaded.tokenizer
  align_to = loaded.msa_config.doc_align_to
  length = document_length_fn(tokenizer, align_to)
  records = [generate(_TASK.value, _SEED.value, i, memory_tokens=_MEMORY.value, length_fn=length,
                      min_doc_tokens=_MIN_DOC.value, max_doc_tokens=_MAX_DOC.value,
                      max_docs=_MAX_DOCS.value, align_to=align_to) for i in range(_NUM.value)]
  docs = [len(r.documents) for r in records]
  tokens = [sum(length(pf.wrap_document(i, d)) for i, d in zip(r.doc_ids, r.documents))
            for r in records]
  print(f"memories: {min(docs)}-{max(docs)} documents, {min(tokens)}-{max(tokens)} tokens "
        f"(--memory_tokens={_MEMORY.value})", flush=True)
  shapes = EvalShapes(seq_len_mem=_MEMORY.value, max_docs=max(docs), seq_len_prompt=_PROMPT.value)
  start = time.perf_counter()

  def progress(done, total):
    rate = done / (time.perf_counter() - start)
    print(f"{done}/{total} questions, {rate:.2f}/s, ETA {(total - done) / rate:.0f}s", flush=True)

  result = evaluate_records(loaded.model, loaded.params, tokenizer, records, shapes,
                            batch_size=_BATCH.value, progress=progress, record_log=record_log)
  result["settings"] = {**settings, "memory_documents": [min(docs), max(docs)],
                        "memory_tokens_held": [min(tokens), max(tokens)]}
  print(format_table(result["summary"]))
  if _OUT.value:
    atomic_write_text(_OUT.value, json.dumps(result, indent=1))
    os.remove(record_log.path)


if __name__ == "__main__":
  run(main)
