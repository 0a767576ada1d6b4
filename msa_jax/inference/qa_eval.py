"""Evaluation of Memory Interleave on a list of queries: answers in batches through the driver,
scores every answer (`metrics`) and, when given, asks the LLM judge; returns per-query rows (with
each round's trace) and the summary per task."""

from __future__ import annotations

import time
from typing import Callable, Sequence

from msa_jax.inference import metrics
from msa_jax.inference.interleave import InterleaveDriver
from msa_jax.inference.judge import Judge
from msa_jax.inference.queries import Query


def evaluate(driver: InterleaveDriver, queries: Sequence[Query], *, batch_size: int = 16,
             judge: Judge | None = None,
             log: Callable[[str], None] | None = print) -> dict:
  """{"summary": per-task means (`metrics.summarize`), "records": one row per query}."""
  if not queries:
    raise ValueError("no queries to evaluate")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  rows = []
  start = time.perf_counter()
  for first in range(0, len(queries), batch_size):
    batch = list(queries[first:first + batch_size])
    for q, result in zip(batch, driver.run([q.question for q in batch])):
      row = {"task": q.task, "question": q.question, "answer": q.answer,
             "gold_ids": list(q.gold_ids), "prediction": result.answer, "status": result.status,
             "retrieved_ids": result.retrieved_ids,
             **metrics.score_answer(result.answer, q.answer, result.retrieved_ids, q.gold_ids),
             "rounds": [r.to_json() for r in result.rounds]}
      if judge is not None:
        verdict = judge(q.question, q.answer, result.answer)
        row["judge_score"], row["judge_reply"] = verdict.score, verdict.reply
      rows.append(row)
    if log:
      done, seconds = len(rows), time.perf_counter() - start
      rate = done / seconds
      log(f"{done}/{len(queries)} questions, {rate:.2f} questions/s, ETA "
          f"{(len(queries) - done) / rate:.0f} s")
  keys = metrics.METRICS + (("judge_score",) if judge is not None else ())
  summary = metrics.summarize(rows, keys)
  if judge is not None:
    summary["all"]["judge_unparsed"] = sum(r["judge_score"] is None for r in rows)
  return {"summary": summary, "records": rows}
