"""Held-out evaluation of a trained MSA model on memory QA records, one retrieval step at a time.

For each record the memory is encoded once (stage 1) and every question is answered by prefills over
that view (stage 2), decoding greedily by re-prefilling a fixed-size prompt buffer (one compiled
program per shape; the KV-cache engine is the generation issue's). Three numbers, as the paper
reports them:
- router recall@n per router layer: the gold documents among the top n by that layer's router score
  for the first-round question (hits ÷ min(#gold, n));
- generative retrieval accuracy: the ids the model writes in its first round (`[i][j]…
  <|object_ref_end|>`) equal the gold set of the first hop;
- answer exact match given the retrieved text: the gold transcript (retrieved documents injected,
  `<End-of-Retrieve>`, the question restated) is given and the model writes the answer.
With a `JsonlLog`, each record's results are written as its batch finishes and a rerun evaluates
only the records the log lacks, so a long evaluation survives a kill.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from msa_jax.data import prompt_format as pf
from msa_jax.data.batch_builder import Sample, build_batch
from msa_jax.data.records import Record
from msa_jax.data.tokenizer import Tokenizer
from msa_jax.data.transcript import num_steps, record_step_sample, restatement
from msa_jax.jsonl_log import JsonlLog
from msa_jax.model import entry_points
from msa_jax.model.model import MSAForCausalLM
from msa_jax.training.losses import router_recall

RECALL_AT = (1, 5, 16)


@dataclasses.dataclass(frozen=True)
class EvalShapes:
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


class _Decoder:
  """Greedy decoding of a batch of prompts over one encoded memory, by re-prefill."""

  def __init__(self, model: MSAForCausalLM, params, shapes: EvalShapes, tokenizer: Tokenizer):
    self.model, self.params, self.shapes, self.tokenizer = model, params, shapes, tokenizer
    self._prefill = jax.jit(entry_points.prefill, static_argnums=0)

  def _batch(self, samples: Sequence[Sample]):
    msa = self.model.msa
    return build_batch(samples, seq_len_mem=self.shapes.seq_len_mem,
                       seq_len_prompt=self.shapes.seq_len_prompt, max_docs=self.shapes.max_docs,
                       chunk_size=msa.chunk_size, question_position=msa.question_position,
                       pad_id=self.tokenizer.pad_id, vocab_size=self.model.config.vocab_size)

  def encode(self, samples: Sequence[Sample]):
    memory, _ = self._batch(samples)
    head = self.tokenizer.encode(pf.TEMPLATE_HEAD)
    return jax.jit(entry_points.encode_memory, static_argnums=0)(
        self.model, self.params, memory, jnp.asarray(head, jnp.int32)).view

  def document_scores(self, samples: Sequence[Sample]):
    """The training forward's every-document router scores of `samples`: ([L, B, D], [B, D])."""
    memory, prompt = self._batch(samples)
    out = jax.jit(entry_points.forward, static_argnums=0)(self.model, self.params, memory, prompt)
    return out.doc_scores, out.doc_present

  def generate(self, view, samples: Sequence[Sample], stop_id: int):
    """Greedy continuations (lists of ids, stop token included) and the first prefill's output."""
    prefixes = [list(s.answer) for s in samples]
    done = [False] * len(samples)
    first = None
    for _ in range(self.shapes.max_new_tokens):
      rows = [dataclasses.replace(s, answer=p, answer_target=()) for s, p in zip(samples, prefixes)]
      _, prompt = self._batch(rows)
      logits, out = self._prefill(self.model, self.params, jax.device_put(prompt), view)
      first = out if first is None else first
      ends = np.asarray(prompt.segment_ids).sum(axis=1) - 1
      next_ids = np.asarray(jnp.argmax(logits, -1))[np.arange(len(samples)), ends]
      for b, tok in enumerate(next_ids):
        if not done[b]:
          prefixes[b].append(int(tok))
          done[b] = int(tok) == stop_id
      if all(done):
        break
    return [p[len(s.answer):] for s, p in zip(samples, prefixes)], first


def _answer_prefix_sample(record: Record, tokenizer: Tokenizer, align_to: int) -> Sample:
  """The answer step with the gold transcript, cut where the model must write the answer."""
  sample = record_step_sample(record, num_steps(record) - 1, tokenizer, align_to=align_to)
  given = len(tokenizer.encode(pf.END_OF_RETRIEVE)) + len(
      restatement(record.question, tokenizer))
  return dataclasses.replace(sample, answer=list(sample.answer)[:given], answer_target=(),
                             answer_value=())


def evaluate(model: MSAForCausalLM, params, tokenizer: Tokenizer, records: Sequence[Record],
             shapes: EvalShapes, *, batch_size: int = 1,
             progress: Callable[[int, int], None] | None = None,
             record_log: JsonlLog | None = None) -> dict:
  """Metrics over `records` (summary and per record), as described in the module docstring."""
  decoder = _Decoder(model, params, shapes, tokenizer)
  ref_end, im_end = tokenizer.object_ref_end_id, tokenizer.im_end_id
  layers, align_to = model.msa.router_layers, model.msa.doc_align_to
  done = {d["index"]: d for d in record_log.read()} if record_log else {}
  todo = [i for i in range(len(records)) if i not in done]
  for start in range(0, len(todo), batch_size):
    indices = todo[start:start + batch_size]
    chunk = [records[i] for i in indices]
    retrieve = [dataclasses.replace(record_step_sample(r, 0, tokenizer, align_to=align_to),
                                    answer=[], answer_target=[]) for r in chunk]
    view = decoder.encode(retrieve)
    written, _ = decoder.generate(view, retrieve, ref_end)
    # recall@n ranks every document (n may exceed the k a selection holds)
    doc_scores, doc_present = decoder.document_scores(retrieve)
    labels = np.zeros((len(chunk), doc_scores.shape[-1]), np.int32)
    for b, s in enumerate(retrieve):
      labels[b, list(s.positive_docs)] = 1
    recalls = {}
    for n in RECALL_AT:
      per = router_recall(doc_scores, doc_present, jnp.asarray(labels), ns=(n,),
                          per_sample=True)[f"recall@{n}"]
      recalls[n] = np.asarray(per)  # [L, B]
    answers, _ = decoder.generate(
        view, [_answer_prefix_sample(r, tokenizer, align_to) for r in chunk], im_end)
    for b, (index, record) in enumerate(zip(indices, chunk)):
      gold_ids = {record.doc_ids[i] for i in record.hops[0]}
      text = tokenizer.decode(written[b])
      answer_text = tokenizer.decode(answers[b])
      done[index] = {
          "index": index, "task": record.task, "question": record.question,
          "gold_ids": sorted(gold_ids),
          "written": text, "pred_ids": list(parse_ids(text)),
          "retrieval_exact": set(parse_ids(text)) == gold_ids,
          "answer": record.answer, "pred_answer": parse_answer(answer_text),
          "answer_exact": parse_answer(answer_text) == record.answer.strip(),
          **{f"recall@{n}/layer{layer}": float(recalls[n][i, b])
             for n in RECALL_AT for i, layer in enumerate(layers)}}
      if record_log:
        record_log.append(done[index])
    if progress:
      progress(len(done), len(records))
  details = [done[i] for i in range(len(records))]
  keys = [k for k in details[0] if k.startswith("recall@") or k.endswith("_exact")]
  summary = {k: float(np.mean([r[k] for r in details])) for k in keys}
  summary["records"] = len(details)
  return {"summary": summary, "records": details}


def format_summary(summary: dict) -> str:
  """A two-column table of the summary metrics."""
  width = max(len(k) for k in summary)
  return "\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                   for k, v in sorted(summary.items()))
