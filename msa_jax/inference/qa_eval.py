"""Evaluation of Memory Interleave on a list of queries: answers in batches through the driver,
scores every answer (`metrics`) and, when given, asks the LLM judge; returns per-query rows (with
each round's trace) and the summary per task.

With `generations` (a `JsonlLog`), every answered question is written as its batch finishes and a
rerun answers only the questions the log lacks, so a long evaluation survives a kill. The judge
runs after all questions are answered, over the rows the `judgements` log lacks (or whose earlier
judgement failed); a failed judgement (after the judge's own retries with backoff) is recorded as
such rather than losing the answers, and after `MAX_JUDGE_FAILURES` failures in a row the rest
are marked unjudged instead of waiting on a judge that is down.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from msa_jax.inference import metrics
from msa_jax.inference.interleave import InterleaveDriver
from msa_jax.inference.judge import Judge, JudgeError
from msa_jax.inference.queries import Query
from msa_jax.jsonl_log import JsonlLog

MAX_JUDGE_FAILURES = 3


def _answered(queries: Sequence[Query], log: JsonlLog | None) -> dict[int, dict]:
  """The rows an earlier run wrote, checked against `queries`."""
  rows = {}
  for row in log.read() if log else []:
    i = row.get("index")
    if not isinstance(i, int) or not 0 <= i < len(queries) or row.get("question") != (
        queries[i].question):
      raise ValueError(f"{log.path}: record {row.get('index')!r} is not one of these queries; "
                       f"remove it to start over")
    rows[i] = row
  return rows


def evaluate(driver: InterleaveDriver, queries: Sequence[Query], *, batch_size: int = 16,
             judge: Judge | None = None, generations: JsonlLog | None = None,
             judgements: JsonlLog | None = None,
             log: Callable[[str], None] | None = print) -> dict:
  """{"summary": per-task means (`metrics.summarize`), "records": one row per query}."""
  if not queries:
    raise ValueError("no queries to evaluate")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  rows = _answered(queries, generations)
  todo = [i for i in range(len(queries)) if i not in rows]
  if rows and log:
    log(f"resuming: {len(rows)} of {len(queries)} questions were answered by an earlier run")
  start = time.perf_counter()
  for first in range(0, len(todo), batch_size):
    batch = todo[first:first + batch_size]
    for i, result in zip(batch, driver.run([queries[i].question for i in batch])):
      q = queries[i]
      rows[i] = {"index": i, "task": q.task, "question": q.question, "answer": q.answer,
                 "gold_ids": list(q.gold_ids), "prediction": result.answer,
                 "status": result.status, "retrieved_ids": result.retrieved_ids,
                 **metrics.score_answer(result.answer, q.answer, result.retrieved_ids,
                                        q.gold_ids),
                 "rounds": [r.to_json() for r in result.rounds]}
      if generations:
        generations.append(rows[i])
    if log:
      done, seconds = first + len(batch), time.perf_counter() - start
      rate = done / seconds
      log(f"{len(rows)}/{len(queries)} questions, {rate:.2f} questions/s, ETA "
          f"{(len(todo) - done) / rate:.0f} s")
  records = [rows[i] for i in range(len(queries))]
  if judge is not None:
    _judge(records, judge, judgements, log)
  keys = metrics.METRICS + (("judge_score",) if judge is not None else ())
  summary = metrics.summarize(records, keys)
  if judge is not None:
    failed = sum(r["judge_error"] is not None for r in records)
    summary["all"]["judge_failed"] = failed
    summary["all"]["judge_unparsed"] = sum(r["judge_score"] is None for r in records) - failed
  return {"summary": summary, "records": records}


def _judge(rows: list[dict], judge: Judge, judgements: JsonlLog | None,
           log: Callable[[str], None] | None) -> None:
  """Adds judge_score, judge_reply and judge_error (None unless the judgement failed) to rows."""
  done = {j["index"]: j for j in judgements.read()} if judgements else {}
  failures = 0
  for row in rows:
    verdict = done.get(row["index"])
    if verdict is None or verdict["judge_error"] is not None:
      if failures >= MAX_JUDGE_FAILURES:
        verdict = {"index": row["index"], "judge_score": None, "judge_reply": None,
                   "judge_error": f"not asked: the judge failed {failures} times in a row"}
      else:
        try:
          v = judge(row["question"], row["answer"], row["prediction"])
          verdict = {"index": row["index"], "judge_score": v.score, "judge_reply": v.reply,
                     "judge_error": None}
          failures = 0
        except JudgeError as e:
          verdict = {"index": row["index"], "judge_score": None, "judge_reply": None,
                     "judge_error": str(e)}
          failures += 1
          if log:
            log(f"judging question {row['index']} failed: {e}")
        if judgements:
          judgements.append(verdict)
    row.update({k: verdict[k] for k in ("judge_score", "judge_reply", "judge_error")})
