"""Host-side (numpy) builder from token lists to padded static-shape `MemoryBatch`/`PromptBatch`.

Shapes are fixed by the caller (or picked from a few buckets), so every batch of a bucket reuses
one compiled program. Bad samples fail here, naming the sample, rather than as a silently wrong
mask or an out-of-range gather inside jit.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from msa_jax.data.batch import MemoryBatch, PromptBatch

_INT32_LIMIT = int(np.iinfo(np.int32).max) + 1


class BatchError(ValueError):
  """A sample (named by its index) or a builder argument cannot form a valid batch."""


@dataclasses.dataclass(frozen=True)
class Sample:
  """One training/eval sample as token ids.

  Prompt layout: [template_head][question][template_tail][context][answer]. `positive_docs` are
  0-based indices into `documents` (the aux loss's positives). The question routes; `context` is
  text already in the transcript (a Memory Interleave step's earlier rounds), and `context_route`
  marks its tokens that route too (the newest retrieved documents). Answer tokens are the LM
  targets, except where `answer_target` (if given) is false: text the driver injects mid-answer.
  Two markers select the targets of extra loss terms (empty = none): `answer_value` the answer
  tokens of the final answer's value (the answer loss; a subset of the targets), `context_target`
  the context tokens of retrieved text injected in earlier rounds (the context LM loss).
  """

  documents: Sequence[Sequence[int]]
  template_head: Sequence[int]
  question: Sequence[int]
  answer: Sequence[int]
  positive_docs: Sequence[int]
  template_tail: Sequence[int] = ()
  context: Sequence[int] = ()
  context_route: Sequence[bool] = ()
  answer_target: Sequence[bool] = ()
  answer_value: Sequence[bool] = ()
  context_target: Sequence[bool] = ()

  @property
  def memory_len(self) -> int:
    """Tokens the documents take in a memory row."""
    return sum(len(d) for d in self.documents)

  @property
  def prompt_len(self) -> int:
    """Tokens the prompt takes in a prompt row."""
    return (len(self.template_head) + len(self.question) + len(self.template_tail) +
            len(self.context) + len(self.answer))


@dataclasses.dataclass(frozen=True)
class _Row:
  """A sample's parts as validated int32 arrays."""

  documents: list[np.ndarray]
  head: np.ndarray
  question: np.ndarray
  tail: np.ndarray
  context: np.ndarray
  context_route: np.ndarray
  context_target: np.ndarray
  answer: np.ndarray
  answer_target: np.ndarray
  answer_value: np.ndarray
  positives: np.ndarray


def as_token_ids(ids, what: str, limit: int, error: type[ValueError] = BatchError) -> np.ndarray:
  """`ids` as a flat int32 array; raises `error` for non-integers and ids outside [0, limit).
  `what` names them in the message (e.g. "sample 3: answer", "request 0: tokens")."""
  arr = np.asarray(ids)
  if arr.size == 0:
    arr = arr.astype(np.int64)  # np.asarray([]) is float64
  if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
    raise error(f"{what} must be a flat sequence of integer ids, got shape {arr.shape} dtype "
                f"{arr.dtype}")
  bad = arr[(arr < 0) | (arr >= limit)]
  if bad.size:
    raise error(f"{what} contains {int(bad[0])}, outside [0, {limit})")
  return arr.astype(np.int32)


def _ids(index: int, what: str, ids, limit: int) -> np.ndarray:
  return as_token_ids(ids, f"sample {index}: {what}", limit)


def _flags(index: int, what: str, flags, length: int, length_of: str,
           empty: bool = False) -> np.ndarray:
  """`flags` as a bool array of `length` (all `empty` when none are given); rejects other
  lengths."""
  arr = np.asarray(flags, dtype=bool).reshape(-1)
  if arr.size == 0:
    return np.full(length, empty)
  if arr.size != length:
    raise BatchError(f"sample {index}: {what} has {arr.size} flags but {length_of} has {length} "
                     f"tokens")
  return arr


def _convert(index: int, sample: Sample, vocab_size: int | None) -> _Row:
  """Checks ids (the answer ids are the labels, so this bounds the labels too), masks, positives."""
  limit = _INT32_LIMIT if vocab_size is None else vocab_size
  docs = [_ids(index, f"document {j}", d, limit) for j, d in enumerate(sample.documents)]
  context = _ids(index, "context", sample.context, limit)
  answer = _ids(index, "answer", sample.answer, limit)
  answer_target = _flags(index, "answer_target", sample.answer_target, answer.size, "answer",
                         empty=True)
  answer_value = _flags(index, "answer_value", sample.answer_value, answer.size, "answer")
  if (answer_value & ~answer_target).any():
    raise BatchError(f"sample {index}: answer_value marks answer token "
                     f"{int(np.argmax(answer_value & ~answer_target))}, which is not a target")
  return _Row(documents=docs,
              head=_ids(index, "template_head", sample.template_head, limit),
              question=_ids(index, "question", sample.question, limit),
              tail=_ids(index, "template_tail", sample.template_tail, limit),
              context=context,
              context_route=_flags(index, "context_route", sample.context_route, context.size,
                                   "context"),
              context_target=_flags(index, "context_target", sample.context_target, context.size,
                                    "context"),
              answer=answer, answer_target=answer_target, answer_value=answer_value,
              positives=_ids(index, "positive_docs", sample.positive_docs, len(docs)))


def _check_memory(index: int, documents: list[np.ndarray], seq_len_mem: int,
                  max_docs: int) -> None:
  """The documents must be non-empty, at most `max_docs`, and fit one row unsplit."""
  if len(documents) > max_docs:
    raise BatchError(f"sample {index}: {len(documents)} documents, more than "
                     f"max_docs={max_docs}")
  for j, doc in enumerate(documents):
    if doc.size == 0:
      raise BatchError(f"sample {index}: document {j} is empty")
    if doc.size > seq_len_mem:
      raise BatchError(f"sample {index}: document {j} has {doc.size} tokens, longer than a memory "
                       f"row (seq_len_mem={seq_len_mem}); documents are never split")
  need = sum(doc.size for doc in documents)
  if need > seq_len_mem:
    raise BatchError(f"sample {index}: documents need {need} tokens but seq_len_mem is "
                     f"{seq_len_mem}")


def _check_prompt(index: int, row: _Row, seq_len_prompt: int, question_position: int) -> None:
  """The prompt needs route tokens, must fit its row, and its head must end before the question."""
  if row.question.size == 0:
    raise BatchError(f"sample {index}: empty question, so no route tokens to score the memory")
  if row.head.size > question_position:
    raise BatchError(f"sample {index}: template head has {row.head.size} tokens but the question "
                     f"starts at position {question_position}; positions would overlap")
  need = row.head.size + row.question.size + row.tail.size + row.context.size + row.answer.size
  if need > seq_len_prompt:
    raise BatchError(f"sample {index}: prompt needs {need} tokens (head {row.head.size}, question "
                     f"{row.question.size}, tail {row.tail.size}, context {row.context.size}, "
                     f"answer {row.answer.size}) but seq_len_prompt is {seq_len_prompt}")


def _fill_memory_row(out: dict[str, np.ndarray], b: int, documents: list[np.ndarray],
                     chunk_size: int) -> None:
  """Packs the documents in order; each is cut into ragged chunks numbered across the row."""
  start, slot = 0, 0
  for doc_id, doc in enumerate(documents, start=1):
    end = start + doc.size
    local = np.arange(doc.size)
    n_chunks = -(-doc.size // chunk_size)
    out["tokens"][b, start:end] = doc
    out["segment_ids"][b, start:end] = doc_id
    out["positions"][b, start:end] = local
    out["chunk_ids"][b, start:end] = slot + local // chunk_size
    out["chunk_doc"][b, slot:slot + n_chunks] = doc_id
    out["chunk_len"][b, slot:slot + n_chunks] = np.minimum(
        chunk_size, doc.size - chunk_size * np.arange(n_chunks))
    start, slot = end, slot + n_chunks


def _prompt_sequence(row: _Row) -> tuple[np.ndarray, np.ndarray]:
  """The prompt's tokens in order, [head][question][tail][context][answer], and its route mask
  (the question, and the context tokens `context_route` marks)."""
  route = np.concatenate([np.zeros(row.head.size, bool), np.ones(row.question.size, bool),
                          np.zeros(row.tail.size, bool), row.context_route,
                          np.zeros(row.answer.size, bool)])
  return np.concatenate([row.head, row.question, row.tail, row.context, row.answer]), route


def _lay_out_prompt(out: dict[str, np.ndarray], b: int, seq: np.ndarray, route: np.ndarray,
                    head: int, question_position: int) -> None:
  """Row b holds `seq`: its first `head` tokens (the template head) memory-blind at positions
  0..head-1, the rest from `question_position` on, seeing memory; `route` marks the route tokens."""
  n = seq.size
  out["tokens"][b, :n] = seq
  out["segment_ids"][b, :n] = 1
  out["positions"][b, :head] = np.arange(head)
  out["positions"][b, head:n] = question_position + np.arange(n - head)
  out["route_mask"][b, :n] = route
  out["sees_memory"][b, head:n] = True


def _fill_prompt_row(out: dict[str, np.ndarray], b: int, row: _Row, question_position: int) -> None:
  """Head at 0..T-1 and memory-blind; the rest from `question_position` on, seeing memory. A
  target token's label and masks sit one position before it (shifted, as the labels are)."""
  seq, route = _prompt_sequence(row)
  _lay_out_prompt(out, b, seq, route, row.head.size, question_position)
  n = seq.size
  answer_start = n - row.answer.size
  context_start = answer_start - row.context.size
  out["labels"][b, answer_start - 1:n - 1] = np.where(row.answer_target, row.answer, -1)
  out["answer_mask"][b, answer_start - 1:n - 1] = row.answer_value
  out["context_mask"][b, context_start - 1:answer_start - 1] = row.context_target
  out["doc_labels"][b, row.positives] = 1


def _check_args(samples, seq_len_mem, seq_len_prompt, max_docs, chunk_size, question_position,
                pad_id, vocab_size) -> None:
  """Builder arguments, checked before any sample so their errors are not blamed on one."""
  if not samples:
    raise BatchError("no samples: a batch needs at least one")
  for name, value in (("seq_len_mem", seq_len_mem), ("seq_len_prompt", seq_len_prompt),
                      ("max_docs", max_docs), ("chunk_size", chunk_size)):
    if value <= 0:
      raise BatchError(f"{name} must be positive, got {value}")
  if question_position < 0:
    raise BatchError(f"question_position must be >= 0, got {question_position}")
  limit = _INT32_LIMIT if vocab_size is None else vocab_size
  if not 0 <= pad_id < limit:
    raise BatchError(f"pad_id {pad_id} outside [0, {limit})")


def _empty_memory(batch: int, seq_len_mem: int, c_max: int, pad_id: int) -> dict[str, np.ndarray]:
  """Memory-stream arrays of `batch` rows holding only padding."""
  return {"tokens": np.full((batch, seq_len_mem), pad_id, np.int32),
          "segment_ids": np.zeros((batch, seq_len_mem), np.int32),
          "positions": np.zeros((batch, seq_len_mem), np.int32),
          "chunk_ids": np.full((batch, seq_len_mem), c_max, np.int32),
          "chunk_doc": np.zeros((batch, c_max), np.int32),
          "chunk_len": np.zeros((batch, c_max), np.int32)}


def _empty_prompt(batch: int, seq_len_prompt: int, max_docs: int, pad_id: int
                  ) -> dict[str, np.ndarray]:
  """Prompt-stream arrays of `batch` rows holding only padding (no labels, no positives)."""
  return {"tokens": np.full((batch, seq_len_prompt), pad_id, np.int32),
          "segment_ids": np.zeros((batch, seq_len_prompt), np.int32),
          "positions": np.zeros((batch, seq_len_prompt), np.int32),
          "route_mask": np.zeros((batch, seq_len_prompt), bool),
          "sees_memory": np.zeros((batch, seq_len_prompt), bool),
          "labels": np.full((batch, seq_len_prompt), -1, np.int32),
          "doc_labels": np.zeros((batch, max_docs), np.int32),
          "answer_mask": np.zeros((batch, seq_len_prompt), bool),
          "context_mask": np.zeros((batch, seq_len_prompt), bool)}


def sample_prompt(sample: Sample, vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """A sample's prompt as one token sequence and its route mask, as `build_batch` lays it out
  (for generation: the engine takes the sample's prompt, answer included, as a request)."""
  return _prompt_sequence(_convert(0, sample, vocab_size))


def build_generation_prompts(prompts: Sequence[tuple[np.ndarray, np.ndarray]], *,
                             seq_len_prompt: int, template_len: int | None,
                             question_position: int, pad_id: int = 0) -> PromptBatch:
  """Prompt rows without targets, for generation: prompt b is (tokens, route_mask), checked by
  the caller, in the training layout (`build_batch`'s): its first `template_len` tokens memory-
  blind at 0..T-1, the rest from `question_position` on, seeing memory. `template_len` None:
  plain prompts at positions 0..n-1 that neither see memory nor route (the backbone)."""
  out = _empty_prompt(len(prompts), seq_len_prompt, 0, pad_id)
  for b, (tokens, route) in enumerate(prompts):
    tokens = np.asarray(tokens, np.int32)
    if tokens.size > seq_len_prompt:
      raise BatchError(f"prompt {b}: {tokens.size} tokens but seq_len_prompt is {seq_len_prompt}")
    if template_len is None:
      _lay_out_prompt(out, b, tokens, np.zeros(tokens.size, bool), tokens.size, 0)
    else:
      _lay_out_prompt(out, b, tokens, np.asarray(route, bool), template_len, question_position)
  return PromptBatch(**out)


def build_memory_batch(rows: Sequence[Sequence[Sequence[int]]], *, batch_rows: int,
                       seq_len_mem: int, max_docs: int, chunk_size: int, pad_id: int,
                       vocab_size: int | None = None) -> MemoryBatch:
  """Memory stream only (bank encoding): `rows[b]` holds the documents packed into row b; rows
  past `len(rows)` up to `batch_rows` are padding, so every batch has one static shape."""
  if not rows or len(rows) > batch_rows:
    raise BatchError(f"need 1..{batch_rows} rows, got {len(rows)}")
  _check_args([rows], seq_len_mem, 1, max_docs, chunk_size, 0, pad_id, vocab_size)
  limit = _INT32_LIMIT if vocab_size is None else vocab_size
  mem = _empty_memory(batch_rows, seq_len_mem, seq_len_mem // chunk_size + max_docs, pad_id)
  for b, docs in enumerate(rows):
    documents = [_ids(b, f"document {j}", d, limit) for j, d in enumerate(docs)]
    _check_memory(b, documents, seq_len_mem, max_docs)
    _fill_memory_row(mem, b, documents, chunk_size)
  return MemoryBatch(**mem)


def build_batch(samples: Sequence[Sample], *, seq_len_mem: int, seq_len_prompt: int,
                max_docs: int, chunk_size: int, question_position: int, pad_id: int,
                vocab_size: int | None = None) -> tuple[MemoryBatch, PromptBatch]:
  """Packs sample b's documents into memory row b and its prompt into prompt row b.

  `chunk_size` and `question_position` come from `MSAConfig` (P and `question_position`). The
  number of chunk slots is C_max = seq_len_mem // chunk_size + max_docs, enough for any row.
  """
  _check_args(samples, seq_len_mem, seq_len_prompt, max_docs, chunk_size, question_position,
              pad_id, vocab_size)
  rows = [_convert(i, s, vocab_size) for i, s in enumerate(samples)]
  for i, row in enumerate(rows):
    _check_memory(i, row.documents, seq_len_mem, max_docs)
    _check_prompt(i, row, seq_len_prompt, question_position)
  batch = len(rows)
  mem = _empty_memory(batch, seq_len_mem, seq_len_mem // chunk_size + max_docs, pad_id)
  prompt = _empty_prompt(batch, seq_len_prompt, max_docs, pad_id)
  for b, row in enumerate(rows):
    _fill_memory_row(mem, b, row.documents, chunk_size)
    _fill_prompt_row(prompt, b, row, question_position)
  return MemoryBatch(**mem), PromptBatch(**prompt)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket holding `n` tokens: a few shapes (and compilations) cover all batches."""
  if not buckets:
    raise BatchError("no buckets given")
  fitting = [b for b in buckets if b >= n]
  if not fitting:
    raise BatchError(f"{n} tokens fit no bucket: the largest of {sorted(buckets)} is "
                     f"{max(buckets)}")
  return min(fitting)


def _bucket_for(lengths: list[int], buckets: Sequence[int], stream: str) -> int:
  """The bucket of the batch's longest row, naming that sample when none fits."""
  longest = int(np.argmax(lengths))
  try:
    return bucket_length(lengths[longest], buckets)
  except BatchError as e:
    raise BatchError(f"sample {longest}: {stream} row: {e}") from None


def build_batch_bucketed(samples: Sequence[Sample], mem_buckets: Sequence[int],
                         prompt_buckets: Sequence[int], *, max_docs: int, chunk_size: int,
                         question_position: int, pad_id: int,
                         vocab_size: int | None = None) -> tuple[MemoryBatch, PromptBatch]:
  """`build_batch` with seq_len_mem/seq_len_prompt the smallest buckets fitting the longest rows."""
  if not samples:
    raise BatchError("no samples: a batch needs at least one")
  seq_len_mem = _bucket_for([s.memory_len for s in samples], mem_buckets, "memory")
  seq_len_prompt = _bucket_for([s.prompt_len for s in samples], prompt_buckets, "prompt")
  return build_batch(samples, seq_len_mem=seq_len_mem, seq_len_prompt=seq_len_prompt,
                     max_docs=max_docs, chunk_size=chunk_size, question_position=question_position,
                     pad_id=pad_id, vocab_size=vocab_size)
