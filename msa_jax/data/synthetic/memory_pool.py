"""A shared synthetic memory for the demo: documents pooled from many synthetic records, and
single-hop, multi-hop and needle questions whose gold documents it holds.

The synthetic generators draw each record's facts independently, so two records can describe the
same person differently. A pooled memory therefore keeps at most one card per person (a card's
subject is its first sentence, `First Last.`): question records are taken only when none of their
gold cards' subjects is taken yet, and distractor cards of a taken subject are skipped. Once the
world runs out of people (3,600), RULER-style haystack documents (filler prose, the odd magic-number
needle) fill the rest of the memory. Needle questions (RULER-style single needle) ask the magic
number of a key that no other needle and no card's subject in the pool shares.

`levels(sizes)` cuts nested memories of several sizes: every level holds every question's gold
documents plus the first distractors that fit, in a random order with random display ids, so the
ids say nothing about which documents are gold.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Sequence

import numpy as np

from msa_jax.data import prompt_format as pf
from msa_jax.data.synthetic import generate
from msa_jax.data.synthetic.tasks import card_subject, needle_keys

_WIDEST_ID = 10 ** 6 - 1  # documents are costed with the widest id they could get


@dataclasses.dataclass(frozen=True)
class Question:
  """A question over a memory: `hops` are the gold documents of each retrieval step as indices
  into the pool's documents (display ids come with a level)."""

  question: str
  answer: str
  hops: tuple[tuple[int, ...], ...]
  task: str


@dataclasses.dataclass(frozen=True)
class MemoryLevel:
  """One memory: its documents' texts and display ids, its questions (gold display ids per hop),
  and its size in wrapped tokens."""

  texts: list[str]
  display_ids: list[int]
  questions: list[Question]
  tokens: int

  def gold_ids(self, q: Question) -> list[int]:
    return list(dict.fromkeys(i for hop in q.hops for i in hop))


@dataclasses.dataclass(frozen=True)
class SyntheticPool:
  """Gold documents first (`num_gold` of them), then distractors in the order they were drawn."""

  documents: list[str]
  num_gold: int
  questions: list[Question]


def build_pool(memory_tokens: int, *, num_single: int, num_multi: int, seed: int,
               length_fn: Callable[[str], int], min_doc_tokens: int = 16,
               max_doc_tokens: int = 512, align_to: int = 0, num_needle: int = 0) -> SyntheticPool:
  """Questions (`num_single` fact lookups, `num_multi` multi-hop chains, `num_needle` single
  needles) and enough distractors to fill `memory_tokens` wrapped tokens, in the documents'
  layout `align_to` (the one `length_fn` counts, `transcript.document_length_fn`)."""
  counts = (("fact_lookup", num_single), ("multi_hop", num_multi), ("niah_single", num_needle))
  if min(n for _, n in counts) < 0 or sum(n for _, n in counts) == 0:
    raise ValueError(f"need at least one question, got {num_single} single-hop, {num_multi} "
                     f"multi-hop and {num_needle} needle")
  cost = lambda text: length_fn(pf.wrap_document(_WIDEST_ID, text))
  taken: set[str] = set()
  documents: list[str] = []
  questions: list[Question] = []
  doc_params = dict(min_doc_tokens=min_doc_tokens, max_doc_tokens=max_doc_tokens,
                    length_fn=length_fn, align_to=align_to)
  for task, count in counts:
    subjects_of = needle_keys if task == "niah_single" else lambda d: [card_subject(d)]
    for index in itertools.count():
      if sum(q.task == task for q in questions) == count:
        break
      if index > 100 * count + 100:
        raise RuntimeError(f"could not draw {count} {task} questions with distinct subjects")
      # a record of only its gold documents: room for each at its longest, no distractors
      n_gold = 4 if task == "multi_hop" else 1
      record = generate(task, seed, index, memory_tokens=n_gold * (max_doc_tokens + 64 + align_to),
                        max_docs=None if task == "multi_hop" else n_gold, **doc_params)
      gold = [i for hop in record.hops for i in hop]
      subjects = [s for i in gold for s in subjects_of(record.documents[i])]
      if len(set(subjects)) < len(subjects) or taken & set(subjects):
        continue
      taken.update(subjects)
      where = {i: len(documents) + k for k, i in enumerate(gold)}
      documents.extend(record.documents[i] for i in gold)
      questions.append(Question(record.question, record.answer,
                                tuple(tuple(where[i] for i in hop) for hop in record.hops), task))
  num_gold = len(documents)
  total = sum(cost(d) for d in documents)
  if total > memory_tokens:
    raise ValueError(f"the questions' {num_gold} gold documents take {total} tokens, more than "
                     f"memory_tokens={memory_tokens}: ask fewer questions or use a larger memory")
  big = 1 << 16  # distractor records: as many documents as fit in this many tokens
  for index in itertools.count():
    record = generate("fact_lookup", seed + 1, index, memory_tokens=big, **doc_params)
    fresh = [d for d in record.documents if card_subject(d) not in taken]
    if not fresh:
      break  # no more people: fill with haystacks
    for d in fresh:
      if total + cost(d) > memory_tokens:
        return SyntheticPool(documents, num_gold, questions)
      taken.add(card_subject(d))
      documents.append(d)
      total += cost(d)
  for index in itertools.count():
    for d in generate("niah_single", seed + 2, index, memory_tokens=big, **doc_params).documents:
      if taken & set(needle_keys(d)):
        continue  # a second needle of an asked key would make its answer ambiguous
      if total + cost(d) > memory_tokens:
        return SyntheticPool(documents, num_gold, questions)
      documents.append(d)
      total += cost(d)
  raise AssertionError("unreachable")


def level(pool: SyntheticPool, memory_tokens: int, *, seed: int,
          length_fn: Callable[[str], int]) -> MemoryLevel:
  """The memory of at most `memory_tokens` wrapped tokens: every gold document and the first
  distractors that fit, shuffled, with display ids 0..n-1 in that shuffled order."""
  costs = np.array([length_fn(pf.wrap_document(_WIDEST_ID, d)) for d in pool.documents])
  gold_cost = int(costs[:pool.num_gold].sum())
  if gold_cost > memory_tokens:
    raise ValueError(f"a memory of {memory_tokens} tokens cannot hold the {pool.num_gold} gold "
                     f"documents ({gold_cost} tokens)")
  within = np.cumsum(costs[pool.num_gold:]) <= memory_tokens - gold_cost
  n = pool.num_gold + int(within.sum())
  rng = np.random.default_rng([seed, memory_tokens])
  order = rng.permutation(n)  # order[k]: the pool document shown as display id k
  position = np.empty(n, np.int64)
  position[order] = np.arange(n)
  texts = [pool.documents[j] for j in order]
  questions = [dataclasses.replace(q, hops=tuple(tuple(int(position[i]) for i in hop)
                                                 for hop in q.hops)) for q in pool.questions]
  tokens = sum(length_fn(pf.wrap_document(k, t)) for k, t in enumerate(texts))
  return MemoryLevel(texts, list(range(n)), questions, tokens)


def levels(pool: SyntheticPool, sizes: Sequence[int], *, seed: int,
           length_fn: Callable[[str], int]) -> list[MemoryLevel]:
  return [level(pool, s, seed=seed, length_fn=length_fn) for s in sizes]
