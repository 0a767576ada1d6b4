"""A memory QA record in text form: what synthetic generators produce and dataset readers return.

A record is the unit the paper trains and evaluates on: a memory (documents), a question, its answer,
and the gold documents of each retrieval step (one step for single-hop questions; a chain for
multi-hop, where step h+1 is retrieved with step h's documents appended). `hops` hold 0-based
indices into `documents`. The id the model reads and writes for document i is `doc_ids[i]`: by
default i itself, but a bank numbers documents globally (MSA_REFERENCE_IMPL.md §3.1), so a record
drawn from a larger memory, or a training record teaching the model to copy ids of any width,
carries its own display ids (see `transcript.py` for the wrapping).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence


class RecordError(ValueError):
  """A record (named by where it came from) is malformed."""


class Round(NamedTuple):
  """One retrieval round of a record's transcript: the hop it serves, the documents it injects,
  and whether it is a miss (a wrong card, `Record.misses`)."""

  hop: int
  documents: tuple[int, ...]
  miss: bool


@dataclasses.dataclass(frozen=True)
class Record:
  """documents: the memory's texts; hops: the gold document ids of each retrieval step, in order;
  task: a label for per-task metrics (e.g. "fact_lookup", "multi_hop", "niah_multi_key")."""

  documents: tuple[str, ...]
  question: str
  answer: str
  hops: tuple[tuple[int, ...], ...]
  task: str = ""
  ids: tuple[int, ...] = ()
  # per hop, the documents injected into the context once that hop is retrieved (empty: the hop's
  # gold documents). A training option adds distractors here, in a random order, so the model
  # learns to read the right card among several, as it must after a top-k router round.
  injections: tuple[tuple[int, ...], ...] = ()
  # per hop, the wrong documents a router round injected (each alone, in its own round) before
  # the hop's documents were retrieved. A training option: the model learns to read the card it
  # was given and to retrieve again when the card is not the one asked for.
  misses: tuple[tuple[int, ...], ...] = ()

  @property
  def doc_ids(self) -> tuple[int, ...]:
    """The display id of each document (`ids`, or 0..n-1 when not given)."""
    return self.ids or tuple(range(len(self.documents)))

  def with_ids(self, ids) -> "Record":
    """The same record with display ids `ids` (checked like `make_record`'s)."""
    return dataclasses.replace(self, ids=_check_ids(ids, len(self.documents), "record"))

  def injected(self, step: int) -> tuple[int, ...]:
    """The documents injected after retrieval step `step`."""
    return self.injections[step] if self.injections else self.hops[step]

  def with_injections(self, injections) -> "Record":
    """The same record injecting `injections` (one tuple per hop, each holding that hop's gold
    documents and valid document indices)."""
    injections = tuple(tuple(int(i) for i in inj) for inj in injections)
    if len(injections) != len(self.hops):
      raise RecordError(f"{len(injections)} injections for {len(self.hops)} hops")
    for h, (hop, inj) in enumerate(zip(self.hops, injections)):
      if not set(hop) <= set(inj) or len(set(inj)) != len(inj):
        raise RecordError(f"injection {h} {list(inj)} must hold hop {list(hop)} once each")
      if not all(0 <= i < len(self.documents) for i in inj):
        raise RecordError(f"injection {h} {list(inj)} is not within [0, {len(self.documents)})")
    return dataclasses.replace(self, injections=injections)

  def with_misses(self, misses) -> "Record":
    """The same record injecting, before each hop's round, that hop's entry of `misses` (one
    tuple per hop) one document per round; a miss must not be a gold document."""
    misses = tuple(tuple(int(i) for i in m) for m in misses)
    if len(misses) != len(self.hops):
      raise RecordError(f"{len(misses)} miss tuples for {len(self.hops)} hops")
    gold = set(self.gold_ids)
    for h, m in enumerate(misses):
      if gold & set(m) or not all(0 <= i < len(self.documents) for i in m):
        raise RecordError(f"misses {list(m)} of hop {h} must be non-gold documents within "
                          f"[0, {len(self.documents)})")
    return dataclasses.replace(self, misses=misses)

  @property
  def rounds(self) -> tuple["Round", ...]:
    """The retrieval rounds in transcript order: a hop's misses, each alone, then the hop's own
    round. The step before a round targets its hop's gold ids."""
    out = []
    for h in range(len(self.hops)):
      out += [Round(h, (i,), True) for i in (self.misses[h] if self.misses else ())]
      out.append(Round(h, self.injected(h), False))
    return tuple(out)

  @property
  def gold_ids(self) -> tuple[int, ...]:
    """Every gold document id, in first-retrieved order, without repeats."""
    return tuple(dict.fromkeys(i for hop in self.hops for i in hop))

  def to_json(self) -> dict:
    out = {"documents": list(self.documents), "question": self.question, "answer": self.answer,
           "positive_ids": [list(h) for h in self.hops], "task": self.task}
    if self.ids:
      out["doc_ids"] = list(self.ids)
    return out


def _check_ids(ids, n: int, where: str) -> tuple[int, ...]:
  ids = tuple(ids)
  if len(ids) != n:
    raise RecordError(f"{where}: {len(ids)} doc_ids for {n} documents")
  if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
    raise RecordError(f"{where}: doc_ids must be non-negative integers")
  if len(set(ids)) != n:
    raise RecordError(f"{where}: doc_ids repeat an id")
  return ids


def make_record(documents: Sequence[str], question: str, answer: str,
                hops: Sequence[Sequence[int]] | Sequence[int], task: str = "",
                where: str = "record", doc_ids: Sequence[int] | None = None) -> Record:
  """A validated `Record`. `hops` may be a flat list of indices (one step); `doc_ids` are the
  documents' display ids (default 0..n-1). Errors name `where`."""
  if not isinstance(question, str) or not question.strip():
    raise RecordError(f"{where}: question must be a non-empty string")
  if not isinstance(answer, str):
    raise RecordError(f"{where}: answer must be a string, got {type(answer).__name__}")
  if isinstance(documents, str) or not all(isinstance(d, str) for d in documents):
    raise RecordError(f"{where}: documents must be a list of strings")
  if any(not d for d in documents):
    raise RecordError(f"{where}: document {[bool(d) for d in documents].index(False)} is empty")
  hops = list(hops)
  if hops and all(isinstance(h, int) and not isinstance(h, bool) for h in hops):
    hops = [hops]
  steps = []
  for h, hop in enumerate(hops):
    if isinstance(hop, (str, bytes)) or not hasattr(hop, "__iter__"):
      raise RecordError(f"{where}: positive_ids step {h} must be a list of document ids")
    ids = list(hop)
    if not ids:
      raise RecordError(f"{where}: positive_ids step {h} is empty")
    for i in ids:
      if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(documents):
        raise RecordError(f"{where}: positive id {i!r} in step {h} is not a document index in "
                          f"[0, {len(documents)})")
    steps.append(tuple(ids))
  if not steps:
    raise RecordError(f"{where}: no positive document ids")
  ids = () if doc_ids is None else _check_ids(doc_ids, len(documents), where)
  return Record(tuple(documents), question, answer, tuple(steps), task, ids)
