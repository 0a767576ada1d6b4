"""A `Record` as training `Sample`s in MSA's generative-retrieval format (paper §3.5, Fig. 3).

A record with H retrieval steps gives H + 1 single-step samples (the paper splits each multi-hop
chain into samples that each cover one step): step h < H is conditioned on the question plus the
documents retrieved in steps 0..h-1 and its target is the ids of step h; step H (the answer step) is
conditioned on the whole retrieval transcript and its target is `<End-of-Retrieve>` followed by the
final answer, with the driver's question restatement in between as context that is not predicted.
A record with misses (`Record.misses`, a training option) has more rounds than hops: a miss round
injects a wrong card, as a router round that picked a near-namesake does, and the step after it
still targets its hop's gold ids, so the model learns to retrieve again rather than to answer
from a card about someone else.

Prompt of step h (MSA_REFERENCE_IMPL.md §5.3), in pieces:

  template_head  `<|im_start|>user\\n`                                        memory-blind
  question       the official instruction around the question               routes
  template_tail  `<|im_end|>\\n<|im_start|>`
  context        for each earlier step j < h:
                   `[i][k]<|object_ref_end|>`    ids the model wrote         does not route
                   `[i]. text_i\\n[k]. text_k\\n`  the documents injected      routes iff j == h-1
                   `<|object_ref_end|>`          closes the injection        does not route
  answer         step h < H: `[..]<|object_ref_end|>`                        target
                 step H:     `<End-of-Retrieve>`                              target
                             `<|im_start|>The user's question is: Q\\n<|object_ref_end|>`  injected
                             `The answer to the question is:` ` A` `<|im_end|>`  target

so the router query of a step is the question plus the newest injected documents, as in the official
re-prefill. Every piece is tokenized on its own and the ids are concatenated (the text is never
re-tokenized as a whole), so the spans of the masks are exact for any tokenizer. The markers of the
extra loss terms are such spans too: `answer_value` is the piece ` A` (the answer loss's targets),
`context_target` every injected-documents piece of the context (the context LM loss's targets).
Documents and questions are user text: special-token strings in them are tokenized as plain text
(`Tokenizer.encode_filled`), so they cannot end a round or fake retrieval markers.

Documents are the record's documents wrapped as `<|im_start|>[id]. text[id]<|im_end|>` with their
display ids (`Record.doc_ids`, by default 0-based indices), tokenized by `document_ids`, which bank
encoding uses too; with `align_to` = P (`MSAConfig.doc_align_to`) the body is padded to whole
chunks so the closing id is a chunk of its own. Ids are written, and documents injected, in the
record's hop order; a record with `injections` injects those documents (and its rounds write their
ids, as the driver's router rounds do), while each step's target stays its gold ids.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

from msa_jax.data import prompt_format as pf
from msa_jax.data.batch_builder import Sample
from msa_jax.data.records import Record
from msa_jax.data.tokenizer import CONTENT


def num_steps(record: Record) -> int:
  """Samples one record gives: one per retrieval round (`Record.rounds`) plus the answer step."""
  return len(record.rounds) + 1


def retrieval_hop(record: Record, step: int) -> int | None:
  """The hop whose gold ids step `step` targets (None: the answer step)."""
  rounds = record.rounds
  return rounds[step].hop if step < len(rounds) else None


def follows_miss(record: Record, step: int) -> bool:
  """Whether step `step` comes right after a miss round (so it must retrieve again)."""
  return 0 < step and record.rounds[step - 1].miss


def _encode(tokenizer, text: str, content: str | None = None) -> list[int]:
  """Ids of protocol `text`; `content`, user text at its CONTENT mark, is tokenized as plain text."""
  return list(tokenizer.encode(text) if content is None else tokenizer.encode_filled(text, content))


def document_ids(tokenizer, doc_id: int, text: str, align_to: int = 0) -> list[int]:
  """The token ids of memory document `text` with display id `doc_id`: `wrap_document` tokenized,
  or, with `align_to` > 0, its body padded with `tokenizer.pad_id` to a multiple of `align_to`
  before the closing `[id]<|im_end|>` (tokenized apart). Training samples and bank encoding both
  call this, so they cannot disagree."""
  if align_to < 0:
    raise ValueError(f"align_to must be >= 0, got {align_to}")
  if not align_to:
    return _encode(tokenizer, pf.wrap_document(doc_id, CONTENT), text)
  body = _encode(tokenizer, pf.document_body(doc_id, CONTENT), text)
  return (body + [tokenizer.pad_id] * (-len(body) % align_to)
          + _encode(tokenizer, pf.document_close(doc_id)))


def _document_length(tokenizer, wrapped: str, align_to: int) -> int:
  return len(document_ids(tokenizer, *pf.unwrap_document(wrapped), align_to))


def document_length_fn(tokenizer, align_to: int = 0) -> Callable[[str], int]:
  """`wrap_document(i, text)` -> its tokens as `document_ids` lays it out: the `length_fn` that
  memory budgets (synthetic generators, official records, the demo's pool) fill memories by, so a
  memory of n budgeted tokens is n tokens in its row."""
  return functools.partial(_document_length, tokenizer, align_to=align_to)


def prompt_pieces(question: str, tokenizer) -> tuple[list[int], list[int], list[int]]:
  """(template head, question, template tail) ids of a question's first-round prompt."""
  return (_encode(tokenizer, pf.TEMPLATE_HEAD),
          _encode(tokenizer, pf.question_text(CONTENT), question),
          _encode(tokenizer, pf.TEMPLATE_TAIL))


class Context(NamedTuple):
  """A retrieval transcript's ids and, per token, whether it routes and whether it is injected
  document text."""

  ids: list[int]
  route: list[bool]
  injected: list[bool]


def restatement(question: str, tokenizer) -> list[int]:
  """Ids of the question restated after `<End-of-Retrieve>` (what the driver injects)."""
  return _encode(tokenizer, pf.restatement(CONTENT), question)


def retrieval_context(rounds: Sequence[tuple[Sequence[int], Sequence[tuple[int, str]]]],
                      tokenizer) -> Context:
  """The transcript of retrieval rounds: its tokens route where they are the newest injected
  documents. A round is (the ids of what the model wrote, `[i][k]<|object_ref_end|>`; the
  (display id, text) documents injected after it). Training samples and the Memory Interleave
  driver both build their contexts here, so the two cannot drift apart."""
  out = Context([], [], [])
  for j, (written, entries) in enumerate(rounds):
    pieces = ((list(written), False, False),
              (_encode(tokenizer, CONTENT, pf.injected_documents(entries)), j == len(rounds) - 1, True),
              (_encode(tokenizer, pf.injection_end()), False, False))
    for piece, routes, injected in pieces:
      out.ids.extend(piece)
      out.route.extend([routes] * len(piece))
      out.injected.extend([injected] * len(piece))
  return out


def _context(record: Record, step: int, tokenizer) -> Context:
  """The transcript of the record's rounds 0..step-1 (`Record.rounds`), each writing the ids of
  what it injects: a hop's gold documents (or them among distractors), or a miss."""
  rounds = []
  for done in record.rounds[:step]:
    entries = [(record.doc_ids[i], record.documents[i]) for i in done.documents]
    rounds.append((_encode(tokenizer, pf.round_ids([i for i, _ in entries])), entries))
  return retrieval_context(rounds, tokenizer)


def record_step_sample(record: Record, step: int, tokenizer, *, align_to: int = 0) -> Sample:
  """The sample of one step: 0 <= step < len(record.rounds) is the retrieval step before round
  `step` (its target: the round's hop's gold ids, after a miss too), step == len(record.rounds)
  the answer step. `tokenizer` is a `Tokenizer`; `align_to` as in `document_ids`."""
  n_rounds = len(record.rounds)
  if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= n_rounds:
    raise ValueError(f"step {step!r} outside [0, {n_rounds}] for a record with {n_rounds} "
                     f"retrieval steps")
  documents = [document_ids(tokenizer, i, text, align_to)
               for i, text in zip(record.doc_ids, record.documents)]
  context = _context(record, step, tokenizer)
  if step < n_rounds:
    positives = record.hops[retrieval_hop(record, step)]
    answer = _encode(tokenizer, pf.round_ids([record.doc_ids[i] for i in positives]))
    answer_target, answer_value = [True] * len(answer), []
  else:
    answer, answer_target, answer_value = [], [], []
    prefix, value, end = pf.final_answer_pieces(record.answer)
    for piece, target, is_value in ((_encode(tokenizer, pf.END_OF_RETRIEVE), True, False),
                                    (restatement(record.question, tokenizer), False, False),
                                    (_encode(tokenizer, prefix), True, False),
                                    (_encode(tokenizer, value), True, True),
                                    (_encode(tokenizer, end), True, False)):
      answer.extend(piece)
      answer_target.extend([target] * len(piece))
      answer_value.extend([is_value] * len(piece))
    positives = record.hops[-1]
  head, question, tail = prompt_pieces(record.question, tokenizer)
  return Sample(documents=documents,
                template_head=head,
                question=question,
                template_tail=tail,
                context=context.ids,
                context_route=context.route,
                context_target=context.injected,
                answer=answer,
                answer_target=answer_target,
                answer_value=answer_value,
                positive_docs=list(positives))


def record_step_samples(record: Record, tokenizer, *, align_to: int = 0) -> list[Sample]:
  """Every step's sample, retrieval steps first, the answer step last."""
  return [record_step_sample(record, step, tokenizer, align_to=align_to)
          for step in range(num_steps(record))]
