"""The memory QA evaluator: every answer scored with one set of metrics (`metrics`: answer exact
match and token F1, retrieval precision/recall/F1/exact of the written ids), one row per question,
summaries per task (`metrics.summarize`), resumable from a `JsonlLog`. Two ways to ask:

- `evaluate_interleave`: Memory Interleave over a bank through the driver (free-running rounds,
  the paper's end-to-end setting), optionally judged by an LLM;
- `evaluate_records`: held-out records, each over its own memory, one retrieval step at a time
  (the paper's three numbers): router recall@n per router layer for the first-round question
  (`router_recall@{n}/layer{l}`: the gold documents among the top n by that layer's score, hits
  ÷ min(#gold, n)); the ids the model writes in its first round against the gold set of the
  first hop (the retrieval metrics); and the answer the model writes given the gold transcript
  (retrieved documents injected, `<End-of-Retrieve>`, the question restated).

All generation goes through the engine (`engine.Engine`, greedy, KV-cached decode).

With a log (`generations`, `record_log`), every answered question is written as its batch
finishes and a rerun answers only the questions the log lacks, so a long evaluation survives a
kill. The judge runs after all questions are answered, over the rows the `judgements` log lacks
(or whose earlier judgement failed); a failed judgement (after the judge's own retries with
backoff) is recorded as such rather than losing the answers, and after `MAX_JUDGE_FAILURES`
failures in a row the rest are marked unjudged instead of waiting on a judge that is down.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from msa_jax.data import prompt_format as pf
from msa_jax.data.batch_builder import Sample, build_batch, sample_prompt
from msa_jax.data.records import Record
from msa_jax.data.tokenizer import Tokenizer
from msa_jax.data.transcript import num_steps, record_step_sample, restatement
from msa_jax.inference import metrics
from msa_jax.inference.engine import Engine
from msa_jax.inference.interleave import InterleaveDriver
from msa_jax.inference.judge import Judge, JudgeError
from msa_jax.inference.queries import Query
from msa_jax.inference.requests import Request
from msa_jax.jsonl_log import JsonlLog
from msa_jax.model import entry_points
from msa_jax.model.model import MSAForCausalLM
from msa_jax.training.losses import router_recall

MAX_JUDGE_FAILURES = 3
RECALL_AT = (1, 5, 16)


def _answered(questions: Sequence[str], log: JsonlLog | None) -> dict[int, dict]:
  """The rows an earlier run wrote, checked against `questions`."""
  rows = {}
  for row in log.read() if log else []:
    i = row.get("index")
    if not isinstance(i, int) or not 0 <= i < len(questions) or row.get("question") != (
        questions[i]):
      raise ValueError(f"{log.path}: record {row.get('index')!r} is not one of these queries; "
                       f"remove it to start over")
    rows[i] = row
  return rows


def _scored_row(index: int, task: str, question: str, answer: str, gold_ids, prediction: str,
                retrieved_ids) -> dict:
  """One question's row: what was asked, what came back, and every metric of `metrics`."""
  return {"index": index, "task": task, "question": question, "answer": answer,
          "gold_ids": list(gold_ids), "prediction": prediction,
          "retrieved_ids": list(retrieved_ids),
          **metrics.score_answer(prediction, answer, retrieved_ids, gold_ids)}


def evaluate_interleave(driver: InterleaveDriver, queries: Sequence[Query], *,
                        batch_size: int = 16, judge: Judge | None = None,
                        generations: JsonlLog | None = None, judgements: JsonlLog | None = None,
                        log: Callable[[str], None] | None = print) -> dict:
  """{"summary": per-task means (`metrics.summarize`), "records": one row per query, with its
  rounds and the driver's status}."""
  if not queries:
    raise ValueError("no queries to evaluate")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  rows = _answered([q.question for q in queries], generations)
  todo = [i for i in range(len(queries)) if i not in rows]
  if rows and log:
    log(f"resuming: {len(rows)} of {len(queries)} questions were answered by an earlier run")
  start = time.perf_counter()
  for first in range(0, len(todo), batch_size):
    batch = todo[first:first + batch_size]
    for i, result in zip(batch, driver.run([queries[i].question for i in batch])):
      q = queries[i]
      rows[i] = {**_scored_row(i, q.task, q.question, q.answer, q.gold_ids, result.answer,
                               result.retrieved_ids),
                 "status": result.status, "rounds": [r.to_json() for r in result.rounds]}
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


# --------------------------------------------------------------------------- held-out records


@dataclasses.dataclass(frozen=True)
class EvalShapes:
  """seq_len_mem / max_docs: a record's memory row; seq_len_prompt: the longest prompt (the
  answer step holds the retrieved documents' text); max_new_tokens per generation."""

  seq_len_mem: int
  max_docs: int
  seq_len_prompt: int
  max_new_tokens: int = 24


def parse_ids(text: str) -> tuple[int, ...]:
  """Every `[n]` in `text`, in order, without repeats."""
  return tuple(pf.parse_ids(text))


def parse_answer(text: str) -> str:
  """The text after the last answer prefix, up to `<|im_end|>`; "" when the model wrote no prefix
  (here the prefix is a target, so its absence is a wrong answer)."""
  return pf.parse_answer(text) if pf.ANSWER_PREFIX.strip() in text else ""


def _answer_prefix_sample(record: Record, tokenizer: Tokenizer, align_to: int) -> Sample:
  """The answer step with the gold transcript, cut where the model must write the answer."""
  sample = record_step_sample(record, num_steps(record) - 1, tokenizer, align_to=align_to)
  given = len(tokenizer.encode(pf.END_OF_RETRIEVE)) + len(
      restatement(record.question, tokenizer))
  return dataclasses.replace(sample, answer=list(sample.answer)[:given], answer_target=(),
                             answer_value=())


def _request(sample: Sample, max_new_tokens: int, stop_id: int, vocab_size: int) -> Request:
  """The engine request continuing a sample's prompt (its answer so far included)."""
  tokens, route = sample_prompt(sample, vocab_size)
  return Request(tokens.tolist(), route.tolist(), max_new_tokens, stop_ids=(stop_id,))


def recall_key(n: int, layer: int) -> str:
  """The row and summary key of router recall@n in router layer `layer`."""
  return f"router_recall@{n}/layer{layer}"


def evaluate_records(model: MSAForCausalLM, params, tokenizer: Tokenizer,
                     records: Sequence[Record], shapes: EvalShapes, *, batch_size: int = 1,
                     progress: Callable[[int, int], None] | None = None,
                     record_log: JsonlLog | None = None) -> dict:
  """{"summary": per-task means (`metrics.summarize`), "records": one row per record}, as the
  module docstring describes; `batch_size` records are encoded (and scored by the router)
  together, and each record's two generations run in one engine batch over its memory."""
  if not records:
    raise ValueError("no records to evaluate")
  msa = model.msa
  head = tokenizer.encode(pf.TEMPLATE_HEAD)
  if len(head) != msa.template_len:
    raise ValueError(f"the template head has {len(head)} tokens but the model's template_len is "
                     f"{msa.template_len}")
  vocab = model.config.vocab_size
  encode = jax.jit(entry_points.encode_memory, static_argnums=0)
  scored_prefill = jax.jit(functools.partial(entry_points.prefill, document_scores=True),
                           static_argnums=0)
  done = _answered([r.question for r in records], record_log)
  todo = [i for i in range(len(records)) if i not in done]
  for start in range(0, len(todo), batch_size):
    indices = todo[start:start + batch_size]
    chunk = [records[i] for i in indices]
    retrieve = [dataclasses.replace(record_step_sample(r, 0, tokenizer, align_to=msa.doc_align_to),
                                    answer=[], answer_target=[]) for r in chunk]
    memory, prompt = build_batch(retrieve, seq_len_mem=shapes.seq_len_mem,
                                 seq_len_prompt=shapes.seq_len_prompt, max_docs=shapes.max_docs,
                                 chunk_size=msa.chunk_size, question_position=msa.question_position,
                                 pad_id=tokenizer.pad_id, vocab_size=vocab)
    view = encode(model, params, memory, jnp.asarray(head, jnp.int32)).view
    # recall@n ranks every document by the router's scores over the encoded memory (n may exceed
    # the k of a selection); encode + prefill is the training forward, at one memory stream's cost
    _, out = scored_prefill(model, params, prompt, view)
    labels = np.zeros((len(chunk), out.doc_scores.shape[-1]), np.int32)  # column d-1: document d
    for b, sample in enumerate(retrieve):
      labels[b, list(sample.positive_docs)] = 1
    recalls = {n: np.asarray(router_recall(out.doc_scores, out.doc_present, jnp.asarray(labels),
                                           ns=(n,), per_sample=True)[f"recall@{n}"])  # [L, B]
               for n in RECALL_AT}
    for b, (index, record) in enumerate(zip(indices, chunk)):
      engine = Engine(model, params, view.row(b), max_batch=2,
                      max_prompt_len=shapes.seq_len_prompt)
      answer_step = _answer_prefix_sample(record, tokenizer, msa.doc_align_to)
      written, answered = engine.generate([
          _request(retrieve[b], shapes.max_new_tokens, tokenizer.object_ref_end_id, vocab),
          _request(answer_step, shapes.max_new_tokens, tokenizer.im_end_id, vocab)])
      text, answer_text = tokenizer.decode(written.tokens), tokenizer.decode(answered.tokens)
      gold_ids = sorted({record.doc_ids[i] for i in record.hops[0]})
      done[index] = {
          **_scored_row(index, record.task, record.question, record.answer.strip(), gold_ids,
                        parse_answer(answer_text), parse_ids(text)),
          "written": text, "answer_written": answer_text,
          **{recall_key(n, layer): float(recalls[n][r, b])
             for n in RECALL_AT for r, layer in enumerate(msa.router_layers)}}
      if record_log:
        record_log.append(done[index])
    if progress:
      progress(len(done), len(records))
  details = [done[i] for i in range(len(records))]
  keys = metrics.METRICS + tuple(recall_key(n, layer) for n in RECALL_AT
                                 for layer in msa.router_layers)
  return {"summary": metrics.summarize(details, keys), "records": details}
