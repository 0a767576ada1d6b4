"""Deterministic synthetic memory tasks: fact lookup, multi-hop chains and RULER-style needles.

Every generator is a pure function of `(seed, index, params)`: record `index` is drawn from its own
numpy `Generator` seeded with `(seed, index, task)`, so any record of a dataset is reproducible
without generating the ones before it.

Memory size: documents are added (gold and required ones first, then distractors) while the sum of
`length_fn(wrap_document(i, text))` stays within `memory_tokens`; the first distractor that would
not fit ends the memory (so does `max_docs`, or running out of distinct entities). `length_fn`
defaults to the world tokenizer's token count; training passes `transcript.document_length_fn`,
exact for the model's document layout. Gold documents then take random positions among the
distractors, and the total is checked again with the final ids.

Document lengths (`min_doc_tokens`..`max_doc_tokens`) count world-tokenizer tokens of the unwrapped
text: each document draws a target length in that range (raised to what its essential facts need)
and is filled up to it with filler sentences. Gold (and other required) documents draw at most
their even share of the memory, so a small memory still holds them; `max_doc_tokens` below what a
gold document's essential facts can take is an error for every record.

Name negatives: the tasks over people's cards (fact lookup, multi-hop) take `name_negatives` = n,
which makes the first n distractors people who share a first or a last name with a gold subject.
Random distractors rarely do (60 first and 60 last names), so a router trained on them can match
on one name alone; the demo's routing misses are such near-namesakes.

Context distractors: the same tasks take `context_distractors` = n, which injects each retrieved
card into the context among 0..n (uniform) distractor cards (near-namesakes of its subject
first, in a random order; `Record.injections`), so the model learns to read the asked person's
card among the router's top few rather than the one card it was given.

Miss rounds: the same tasks take `miss_rate` = p, which puts before each hop's round k rounds
that each inject one wrong card (near-namesakes of the hop's subject first; `Record.misses`),
with P(k >= j) = p**j up to `MAX_MISSES`. The router's top-1 is such a near-namesake when it
errs, and after a miss the step still targets the hop's gold ids: the model learns to check the
injected card's name against the one asked for and to retrieve again, so Memory Interleave can
recover from a routing miss instead of answering from someone else's card.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import re
import zlib
from typing import Callable, Sequence

import numpy as np

from msa_jax.data import prompt_format
from msa_jax.data.records import Record, make_record
from msa_jax.data.synthetic import world
from msa_jax.data.synthetic.world_tokenizer import SPECIAL_TOKENS, count_tokens

LengthFn = Callable[[str], int]

DEFAULT_MEMORY_TOKENS = 8192
DEFAULT_MIN_DOC_TOKENS = 16
DEFAULT_MAX_DOC_TOKENS = 1024


@functools.lru_cache(maxsize=None)
def default_length_fn() -> LengthFn:
  """Token length of a wrapped document under the world tokenizer, computed without running it:
  each special-token string is one token and the rest is counted by `count_tokens` (the same pieces
  the tokenizer's pre-tokenizer cuts; a test checks the two agree)."""
  special = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))

  def length(wrapped: str) -> int:
    parts = special.split(wrapped)
    return len(parts) - 1 + sum(count_tokens(p) for p in parts)

  return length


def _rng(task: str, seed: int, index: int) -> np.random.Generator:
  for name, v in (("seed", seed), ("index", index)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
      raise ValueError(f"{task}: {name} must be a non-negative int, got {v!r}")
  return np.random.default_rng([int(seed), int(index), zlib.crc32(task.encode())])


# --- filler sentences -----------------------------------------------------------------------------

_MAX_SENTENCE = 16  # the pool holds sentences of every length 2.._MAX_SENTENCE tokens
_BULK_MIN = 6  # bulk filler draws sentences at least this long
_POOL_PER_LENGTH = 64


def _sentence(rng: np.random.Generator, n: int) -> str:
  """A filler sentence of exactly `n` >= 2 tokens."""
  pick = lambda seq: seq[int(rng.integers(len(seq)))]
  if n == 2:
    return f"{pick(world.FILLER_INTERJECTIONS)}."
  if n == 3:
    return f"{pick(world.FILLER_PRONOUNS)} {pick(world.FILLER_VERBS)}."
  # 4 tokens: "Starter noun verb." plus optional parts of these sizes.
  combos = [c for c in itertools.product((0, 1, 2), (0, 1), (0, 3, 4), (0, 3, 4), (0, 4, 5))
            if sum(c) == n - 4 and (c[2] or not c[3])]
  adjs, adverb, pp1, pp2, clause = combos[int(rng.integers(len(combos)))]
  words = [pick(world.FILLER_STARTERS)] + [pick(world.FILLER_ADJECTIVES) for _ in range(adjs)]
  words += [pick(world.FILLER_NOUNS), pick(world.FILLER_VERBS)]
  if adverb:
    words.append(pick(world.FILLER_ADVERBS))
  for pp in (pp1, pp2):
    if pp:
      words += [pick(world.FILLER_PREPOSITIONS), "the"]
      words += [pick(world.FILLER_ADJECTIVES)] if pp == 4 else []
      words.append(pick(world.FILLER_NOUNS))
  if clause:
    words += ["while", "the"] + ([pick(world.FILLER_ADJECTIVES)] if clause == 5 else [])
    words += [pick(world.FILLER_NOUNS), pick(world.FILLER_VERBS)]
  return " ".join(words) + "."


@functools.lru_cache(maxsize=None)
def _filler_pool():
  """(sentences, token lengths, {length: indices}, indices of bulk sentences), fixed by a seed."""
  rng = np.random.default_rng(20240611)
  sentences = [_sentence(rng, n) for n in range(2, _MAX_SENTENCE + 1)
               for _ in range(_POOL_PER_LENGTH)]
  lengths = np.array([count_tokens(s) for s in sentences], dtype=np.int64)
  expected = np.repeat(np.arange(2, _MAX_SENTENCE + 1), _POOL_PER_LENGTH)
  assert (lengths == expected).all(), "filler sentence lengths drifted from their targets"
  by_length = {n: np.flatnonzero(lengths == n) for n in range(2, _MAX_SENTENCE + 1)}
  bulk = np.flatnonzero(lengths >= _BULK_MIN)
  return sentences, lengths, by_length, bulk


def _filler(rng: np.random.Generator, n: int) -> list[str]:
  """Filler sentences of `n` tokens in all (a lone 1-token remainder is one period-less word)."""
  if n <= 0:
    return []
  if n == 1:
    return [world.FILLER_INTERJECTIONS[int(rng.integers(len(world.FILLER_INTERJECTIONS)))]]
  sentences, lengths, by_length, bulk = _filler_pool()
  chosen: list[int] = []
  tail = 2 * _MAX_SENTENCE
  if n > tail:  # vectorised bulk: enough draws to pass n - tail, keep the prefix that stays below
    idx = bulk[rng.integers(len(bulk), size=n // _BULK_MIN + 1)]
    cum = np.cumsum(lengths[idx])
    k = int(np.searchsorted(cum, n - tail, side="right"))
    chosen.extend(idx[:k].tolist())
    n -= int(cum[k - 1]) if k else 0
  while n > _MAX_SENTENCE:  # leaves a remainder of _BULK_MIN.._MAX_SENTENCE
    m = int(rng.integers(_BULK_MIN, min(_MAX_SENTENCE, n - _BULK_MIN) + 1))
    chosen.append(int(rng.choice(by_length[m])))
    n -= m
  chosen.append(int(rng.choice(by_length[n])))
  return [sentences[i] for i in chosen]


# --- documents ------------------------------------------------------------------------------------

def _doc_target(rng, essential: int, min_tokens: int, max_tokens: int, what: str,
                cap: int | None = None) -> int:
  """A document length drawn in [min_tokens, max_tokens] (upper end lowered to `cap`, if given, but
  never below what the document's essential facts need)."""
  if essential > max_tokens:
    raise ValueError(f"{what} needs {essential} tokens, more than max_doc_tokens={max_tokens}")
  lo = max(min_tokens, essential)
  hi = max_tokens if cap is None else max(lo, min(max_tokens, cap))
  return int(rng.integers(lo, hi + 1))


def _gold_cap(memory_tokens: int, n_fixed: int, align_to: int) -> int:
  """Upper length of gold/required documents: their even share of the memory less an allowance for
  the wrapper (`<|im_start|>[i]. ...[i]<|im_end|>` is 7 + 2 * digits(i) world tokens) and for the
  padding of the aligned layout (`align_to`, see `transcript.document_ids`), so that with the world
  tokenizer they always fit when their essential facts do."""
  return memory_tokens // n_fixed - 16 - align_to


def _fill_to(rng, used: int, target: int, min_tokens: int, max_tokens: int) -> list[str]:
  """Filler for a document of `used` tokens so far to reach about `target` (within bounds)."""
  rest = target - used
  if rest == 1:  # one token cannot be a sentence: shorten or lengthen by one when bounds allow
    if target - 1 >= max(min_tokens, used):
      rest = 0
    elif target + 1 <= max_tokens:
      rest = 2
  return _filler(rng, rest)


def _card(rng, subject: str, required: Sequence[str], optional: Sequence[str], n_optional: int,
          min_tokens: int, max_tokens: int, what: str, cap: int | None = None) -> str:
  """`Subject. clause. clause. ...` + filler: every required clause, then as many of the first
  `n_optional` optional clauses as fit the drawn length, in a random order, then filler."""
  head = f"{subject}."
  essential = count_tokens(head) + sum(count_tokens(c) for c in required)
  target = _doc_target(rng, essential, min_tokens, max_tokens, what, cap)
  clauses, used = list(required), essential
  for c in optional[:n_optional]:
    k = count_tokens(c)
    if used + k <= target:
      clauses.append(c)
      used += k
  clauses = [clauses[i] for i in rng.permutation(len(clauses))]
  return " ".join([head] + clauses + _fill_to(rng, used, target, min_tokens, max_tokens))


def _fact_card(rng, entity: int, asked: tuple[str, str] | None, min_attributes: int,
               max_attributes: int, min_tokens: int, max_tokens: int, cap: int | None = None
               ) -> str:
  """A fact card of `entity` with min..max_attributes random attributes; `asked` (attribute,
  value), if given, is one of them for sure."""
  attrs = _random_attributes(rng, exclude=(asked[0],) if asked else ())
  required = [_attribute_clause(*asked)] if asked else []
  n_opt = max(0, _n_attributes(rng, min_attributes, max_attributes) - len(required))
  return _card(rng, world.entity_name(entity), required,
               [_attribute_clause(a, v) for a, v in attrs], n_opt, min_tokens, max_tokens,
               "a fact card's name and asked attribute", cap)


def _attribute_clause(attr: str, value: str) -> str:
  return f"{attr}: {value}."


def _random_attributes(rng, exclude: Sequence[str] = ()) -> list[tuple[str, str]]:
  """Every attribute but `exclude`, in a random order, each with a random value."""
  names = [a for a in world.ATTRIBUTE_NAMES if a not in exclude]
  out = []
  for i in rng.permutation(len(names)):
    vals = world.ATTRIBUTES[names[i]]
    out.append((names[i], vals[int(rng.integers(len(vals)))]))
  return out


def _needle(key: str, value: str) -> str:
  return f"The special magic number for {key} is: {value}."


_NEEDLE_KEY = re.compile(r"The special magic number for (.+?) is: ")


def needle_keys(document: str) -> list[str]:
  """The keys of the needles a document holds (`The special magic number for KEY is: ...`)."""
  return _NEEDLE_KEY.findall(document)


def _haystack(rng, min_tokens: int, max_tokens: int, needle: str | None = None,
              cap: int | None = None) -> str:
  """Filler passage of a drawn length; `needle` (if any) sits at a random sentence boundary."""
  essential = count_tokens(needle) if needle else 0
  target = _doc_target(rng, essential, min_tokens, max_tokens, "a needle sentence", cap)
  sentences = _fill_to(rng, essential, target, min_tokens, max_tokens)
  if needle:
    sentences.insert(int(rng.integers(len(sentences) + 1)), needle)
  return " ".join(sentences)


# --- memory assembly ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _essential_tokens(kind: str) -> int:
  """The most tokens the essential facts of a gold document of this kind can take."""
  name = count_tokens(world.entity_name(0) + ".")
  attr = max(count_tokens(_attribute_clause(a, v))
             for a, vals in world.ATTRIBUTES.items() for v in vals)
  relation = max(count_tokens(f"{r}: {world.entity_name(0)}.") for r in world.RELATIONS)
  return {"fact": name + attr, "chain": name + max(attr, relation),
          "needle": count_tokens(_needle(world.entity_name(0), "1234567"))}[kind]


def _check_params(task, memory_tokens, min_doc_tokens, max_doc_tokens, max_docs, kind,
                  align_to=0):
  """Parameter checks; `max_doc_tokens` must hold the longest essential facts of `kind` (checked
  here, so that a too-small value fails for every record rather than for unlucky ones)."""
  need = _essential_tokens(kind)
  if max_doc_tokens < need:
    raise ValueError(f"{task}: max_doc_tokens={max_doc_tokens} is below the {need} tokens a gold "
                     f"document's essential facts can take")
  if not isinstance(memory_tokens, (int, np.integer)) or memory_tokens <= 0:
    raise ValueError(f"{task}: memory_tokens must be a positive int, got {memory_tokens!r}")
  if not 1 <= min_doc_tokens <= max_doc_tokens:
    raise ValueError(f"{task}: need 1 <= min_doc_tokens <= max_doc_tokens, got "
                     f"{min_doc_tokens}, {max_doc_tokens}")
  if max_docs is not None and max_docs < 1:
    raise ValueError(f"{task}: max_docs must be positive or None, got {max_docs}")
  if not isinstance(align_to, (int, np.integer)) or align_to < 0:
    raise ValueError(f"{task}: align_to must be an int >= 0, got {align_to!r}")


def _assemble(rng, task: str, fixed: Sequence[str], n_gold: int,
              next_distractor: Callable[[], str | None], memory_tokens: int,
              length_fn: LengthFn | None, max_docs: int | None) -> tuple[list[str], list[int]]:
  """The memory's documents and the final ids of `fixed[:n_gold]` (the gold documents, in order).

  `fixed` (gold documents then other required ones) always go in; distractors from
  `next_distractor()` (None: no more) are added until one would overflow `memory_tokens`."""
  length_fn = length_fn or default_length_fn()
  docs = list(fixed)
  total = sum(length_fn(prompt_format.wrap_document(i, d)) for i, d in enumerate(docs))
  if total > memory_tokens:
    raise ValueError(f"{task}: its {len(docs)} gold/required documents take {total} wrapped "
                     f"tokens, more than memory_tokens={memory_tokens}")
  if max_docs is not None and len(docs) > max_docs:
    raise ValueError(f"{task}: needs {len(docs)} gold/required documents, more than "
                     f"max_docs={max_docs}")
  while max_docs is None or len(docs) < max_docs:
    d = next_distractor()
    if d is None:
      break
    n = length_fn(prompt_format.wrap_document(len(docs), d))
    if total + n > memory_tokens:
      break
    docs.append(d)
    total += n
  order = rng.permutation(len(docs)).tolist()  # order[k]: which document sits at id k
  while True:  # ids changed: re-check (a no-op for lengths that do not depend on the id's order)
    total = sum(length_fn(prompt_format.wrap_document(k, docs[j])) for k, j in enumerate(order))
    if total <= memory_tokens:
      break
    if max(order) < len(fixed):
      raise ValueError(f"{task}: its {len(fixed)} gold/required documents take {total} wrapped "
                       f"tokens at their final ids, more than memory_tokens={memory_tokens}")
    order.remove(max(order))  # drop the last-added distractor (gold/required come first)
  position = {j: k for k, j in enumerate(order)}
  return [docs[j] for j in order], [position[g] for g in range(n_gold)]


def _entities(rng) -> np.ndarray:
  return rng.permutation(world.NUM_ENTITIES)


def _check_count(task, name, value):
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
    raise ValueError(f"{task}: {name} must be an int >= 0, got {value!r}")


def _name_negatives_first(candidates: np.ndarray, gold: Sequence[int], n: int) -> list[int]:
  """`candidates` (a random order) with up to `n` near-namesakes of the `gold` entities moved to
  the front: by turns a gold subject's next same-last-name, then same-first-name candidate,
  cycling over the gold subjects. Draws nothing from the rng, so n = 0 changes no record."""
  order = [int(e) for e in candidates]
  if n == 0:
    return order
  width = len(world.LAST_NAMES)
  queues = [[e for e in order if e % width == g % width] for g in gold]
  queues += [[e for e in order if e // width == g // width] for g in gold]
  picked: dict[int, None] = {}
  while len(picked) < n and any(queues):
    for q in queues:
      while q and q[0] in picked:
        q.pop(0)
      if q and len(picked) < n:
        picked[q.pop(0)] = None
  return list(picked) + [e for e in order if e not in picked]


def card_subject(card: str) -> str:
  """The person a fact card is about: its leading sentence, `First Last`."""
  return card.split(".", 1)[0]


def _near_namesakes_first(rng, names: Sequence[Sequence[str]], hop: Sequence[int],
                          used: set[int]) -> list[int]:
  """The documents (their subjects' `names`) not in `used`, in a random order with the
  near-namesakes of the hop's subject (its last card's) first."""
  first, last = names[hop[-1]][0], names[hop[-1]][-1]
  others = [int(i) for i in rng.permutation(len(names)) if int(i) not in used]
  near = [i for i in others if names[i][0] == first or names[i][-1] == last]
  return near + [i for i in others if i not in near]


def _with_context_distractors(rng, record: Record, n: int) -> Record:
  """`record` injecting each hop's card among up to n other cards (see the module doc); n = 0 draws
  nothing from the rng, so it changes no record."""
  if n == 0:
    return record
  names = [card_subject(doc).split() for doc in record.documents]
  used = set(record.gold_ids)  # a card is injected once, as the driver skips injected ones
  injections = []
  for hop in record.hops:
    extras = _near_namesakes_first(rng, names, hop, used)[:int(rng.integers(n + 1))]
    used.update(extras)
    injections.append(tuple(int(i) for i in rng.permutation(list(hop) + extras)))
  return record.with_injections(injections)


MAX_MISSES = 3  # miss rounds before one hop, at most


def _with_misses(rng, record: Record, rate: float) -> Record:
  """`record` with miss rounds (see the module doc): before each hop, k wrong cards, each in its
  own round, where P(k >= j) = rate**j up to MAX_MISSES; near-namesakes of the hop's subject
  first. rate = 0 draws nothing from the rng, so it changes no record."""
  if rate == 0:
    return record
  names = [card_subject(doc).split() for doc in record.documents]
  used = {i for h in range(len(record.hops)) for i in record.injected(h)}  # holds every gold
  misses = []
  for hop in record.hops:
    k = 0
    while k < MAX_MISSES and rng.random() < rate:
      k += 1
    wrong = _near_namesakes_first(rng, names, hop, used)[:k] if k else []
    used.update(wrong)
    misses.append(tuple(wrong))
  return record.with_misses(misses)


def _check_rate(task, name, value):
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
    raise ValueError(f"{task}: {name} must be a number in [0, 1), got {value!r}")


def _question_attr(rng) -> str:
  return world.ATTRIBUTE_NAMES[int(rng.integers(len(world.ATTRIBUTE_NAMES)))]


def _n_attributes(rng, min_attributes, max_attributes) -> int:
  return int(rng.integers(min_attributes, max_attributes + 1))


def _check_attributes(task, min_attributes, max_attributes):
  if not 1 <= min_attributes <= max_attributes <= len(world.ATTRIBUTE_NAMES):
    raise ValueError(f"{task}: need 1 <= min_attributes <= max_attributes <= "
                     f"{len(world.ATTRIBUTE_NAMES)}, got {min_attributes}, {max_attributes}")


def _where(task, seed, index):
  return f"{task}(seed={seed}, index={index})"


# --- tasks ----------------------------------------------------------------------------------------

def fact_lookup(seed: int, index: int, *, memory_tokens: int = DEFAULT_MEMORY_TOKENS,
                length_fn: LengthFn | None = None, min_doc_tokens: int = DEFAULT_MIN_DOC_TOKENS,
                max_doc_tokens: int = DEFAULT_MAX_DOC_TOKENS, max_docs: int | None = None,
                min_attributes: int = 3, max_attributes: int = 5, align_to: int = 0,
                name_negatives: int = 0, context_distractors: int = 0,
                miss_rate: float = 0.0) -> Record:
  """Fact cards `First Last. attr: value. ...` + filler; asks one attribute of one entity.
  `align_to` (every task takes it): the documents' layout, which gold documents leave room for.
  `name_negatives`, `context_distractors`, `miss_rate`: see the module doc."""
  task = "fact_lookup"
  _check_params(task, memory_tokens, min_doc_tokens, max_doc_tokens, max_docs, "fact", align_to)
  _check_attributes(task, min_attributes, max_attributes)
  _check_count(task, "name_negatives", name_negatives)
  _check_count(task, "context_distractors", context_distractors)
  _check_rate(task, "miss_rate", miss_rate)
  rng = _rng(task, seed, index)
  ents = _entities(rng)

  def card(entity, asked=None):
    return _fact_card(rng, entity, asked, min_attributes, max_attributes, min_doc_tokens,
                      max_doc_tokens, _gold_cap(memory_tokens, 1, align_to) if asked else None)

  attr = _question_attr(rng)
  values = world.ATTRIBUTES[attr]
  value = values[int(rng.integers(len(values)))]
  name = world.entity_name(int(ents[0]))
  gold = card(int(ents[0]), (attr, value))
  pool = _Peekable(_name_negatives_first(ents[1:], [int(ents[0])], name_negatives))
  docs, (gid,) = _assemble(rng, task, [gold], 1, lambda: card(next(pool)) if pool.has() else None,
                           memory_tokens, length_fn, max_docs)
  record = make_record(docs, f"What is the {attr} of {name}?", value, [(gid,)], task,
                       _where(task, seed, index))
  return _with_misses(rng, _with_context_distractors(rng, record, context_distractors), miss_rate)


class _Peekable:
  """An iterator that can tell whether it has another item."""

  def __init__(self, it):
    self._it, self._buf = iter(it), []

  def has(self) -> bool:
    if not self._buf:
      self._buf = list(itertools.islice(self._it, 1))
    return bool(self._buf)

  def __next__(self):
    return self._buf.pop() if self.has() else next(self._it)


def multi_hop(seed: int, index: int, *, memory_tokens: int = DEFAULT_MEMORY_TOKENS,
              length_fn: LengthFn | None = None, min_doc_tokens: int = DEFAULT_MIN_DOC_TOKENS,
              max_doc_tokens: int = DEFAULT_MAX_DOC_TOKENS, max_docs: int | None = None,
              num_hops: int | None = None, min_hops: int = 2, max_hops: int = 4,
              min_attributes: int = 3, max_attributes: int = 5, align_to: int = 0,
              name_negatives: int = 0, context_distractors: int = 0,
              miss_rate: float = 0.0) -> Record:
  """A chain E0 -r0-> E1 -r1-> ... -> E_{h-1}: asks an attribute of E_{h-1} through the relations.

  Document j (of E_j) states `r_j: E_{j+1}.`; the last one holds the asked attribute. hops are the
  chain's documents in order. `num_hops` fixes h, else it is drawn in [min_hops, max_hops].
  `name_negatives` (near-namesakes of any chain entity), `context_distractors`, `miss_rate`: see
  the module doc."""
  task = "multi_hop"
  _check_params(task, memory_tokens, min_doc_tokens, max_doc_tokens, max_docs, "chain", align_to)
  _check_attributes(task, min_attributes, max_attributes)
  _check_count(task, "name_negatives", name_negatives)
  _check_count(task, "context_distractors", context_distractors)
  _check_rate(task, "miss_rate", miss_rate)
  if not 2 <= min_hops <= max_hops:
    raise ValueError(f"{task}: need 2 <= min_hops <= max_hops, got {min_hops}, {max_hops}")
  if num_hops is not None and num_hops < 2:
    raise ValueError(f"{task}: num_hops must be at least 2, got {num_hops}")
  rng = _rng(task, seed, index)
  h = num_hops if num_hops is not None else int(rng.integers(min_hops, max_hops + 1))
  ents = _entities(rng)
  chain = [int(e) for e in ents[:h]]
  others = ents[h:]  # never chain entities: relation objects of extra facts, distractor subjects
  relations = [world.RELATIONS[int(i)] for i in rng.integers(len(world.RELATIONS), size=h - 1)]
  attr = _question_attr(rng)
  values = world.ATTRIBUTES[attr]
  value = values[int(rng.integers(len(values)))]

  def card(entity, required, exclude_attr=(), exclude_rel=(), cap=None):
    """Required facts, then (as they fit) attributes and 0-2 relations to non-chain entities."""
    n_attr = max(0, _n_attributes(rng, min_attributes, max_attributes) - len(required))
    facts = [_attribute_clause(a, v) for a, v in _random_attributes(rng, exclude_attr)[:n_attr]]
    rels = [r for r in world.RELATIONS if r not in exclude_rel]
    for i in rng.permutation(len(rels))[:int(rng.integers(0, 3))]:
      obj = world.entity_name(int(others[int(rng.integers(len(others)))]))
      facts.append(f"{rels[i]}: {obj}.")
    facts = [facts[i] for i in rng.permutation(len(facts))]
    return _card(rng, world.entity_name(entity), required, facts, len(facts), min_doc_tokens,
                 max_doc_tokens, "a multi-hop document's name and chain fact", cap)

  gold = []
  for j, e in enumerate(chain):
    if j < h - 1:
      gold.append(card(e, [f"{relations[j]}: {world.entity_name(chain[j + 1])}."],
                       exclude_rel=(relations[j],), cap=_gold_cap(memory_tokens, h, align_to)))
    else:
      gold.append(card(e, [_attribute_clause(attr, value)], exclude_attr=(attr,),
                       cap=_gold_cap(memory_tokens, h, align_to)))
  pool = _Peekable(_name_negatives_first(others, chain, name_negatives))
  docs, gids = _assemble(rng, task, gold, h, lambda: card(next(pool), []) if pool.has() else None,
                         memory_tokens, length_fn, max_docs)
  path = "".join(f" of the {r}" for r in reversed(relations))
  question = f"What is the {attr}{path} of {world.entity_name(chain[0])}?"
  record = make_record(docs, question, value, [(g,) for g in gids], task, _where(task, seed, index))
  return _with_misses(rng, _with_context_distractors(rng, record, context_distractors), miss_rate)


def _magic_values(rng, n: int) -> list[str]:
  out: list[str] = []
  while len(out) < n:
    d = int(rng.integers(4, 8))
    v = str(int(rng.integers(10 ** (d - 1), 10 ** d)))
    if v not in out:
      out.append(v)
  return out


def _niah(task: str, seed: int, index: int, n_needles: int, n_gold_keys: int, same_key: bool,
          memory_tokens, length_fn, min_doc_tokens, max_doc_tokens, max_docs, align_to,
          card_distractors: float = 0.0) -> Record:
  """Shared NIAH builder: `n_needles` needle documents; the first `n_gold_keys` keys are asked
  (all needles share one key when `same_key`); the rest are distractor needles. Each distractor
  is a fact card with probability `card_distractors` (of people other than the keys), else a
  haystack passage."""
  _check_params(task, memory_tokens, min_doc_tokens, max_doc_tokens, max_docs, "needle", align_to)
  _check_rate(task, "card_distractors", card_distractors)
  if n_needles < 1:
    raise ValueError(f"{task}: needs at least one needle, got {n_needles}")
  rng = _rng(task, seed, index)
  ents = _entities(rng)
  n_keys = 1 if same_key else n_needles
  keys = [world.entity_name(int(e)) for e in ents[:n_keys]]
  if same_key:
    keys = keys * n_needles
  values = _magic_values(rng, n_needles)
  cap = _gold_cap(memory_tokens, n_needles, align_to)
  needles = [_haystack(rng, min_doc_tokens, max_doc_tokens, _needle(k, v), cap)
             for k, v in zip(keys, values)]
  n_gold = n_needles if same_key else n_gold_keys
  card_people = iter(ents[n_keys:])

  def distractor():  # draws nothing more from the rng when card_distractors is 0
    if card_distractors and rng.random() < card_distractors:
      person = next(card_people, None)
      if person is not None:
        return _fact_card(rng, int(person), None, 3, 5, min_doc_tokens, max_doc_tokens)
    return _haystack(rng, min_doc_tokens, max_doc_tokens)

  docs, gids = _assemble(rng, task, needles, n_gold, distractor, memory_tokens, length_fn,
                         max_docs)
  if same_key:
    question = f"What are all the special magic numbers for {keys[0]} mentioned in the provided text?"
    answer = ", ".join(values[g] for g in np.argsort(gids, kind="stable"))
  elif n_gold_keys == 1:
    question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
    answer = values[0]
  else:
    asked = keys[:n_gold_keys]
    listed = ", ".join(asked[:-1]) + " and " + asked[-1]
    question = f"What are all the special magic numbers for {listed} mentioned in the provided text?"
    answer = ", ".join(values[:n_gold_keys])
  return make_record(docs, question, answer, [tuple(sorted(gids))], task,
                     _where(task, seed, index))


def niah_single(seed: int, index: int, *, memory_tokens: int = DEFAULT_MEMORY_TOKENS,
                length_fn: LengthFn | None = None, min_doc_tokens: int = DEFAULT_MIN_DOC_TOKENS,
                max_doc_tokens: int = DEFAULT_MAX_DOC_TOKENS,
                max_docs: int | None = None, align_to: int = 0,
                card_distractors: float = 0.0) -> Record:
  """One needle `The special magic number for {key} is: {value}.` in a haystack; asks its value.
  `card_distractors` (every needle task takes it): the share of distractors that are fact cards
  instead of haystack passages, so a needle question learns to route past people's cards (the
  demo's shared memory holds both)."""
  return _niah("niah_single", seed, index, 1, 1, False, memory_tokens, length_fn, min_doc_tokens,
               max_doc_tokens, max_docs, align_to, card_distractors)


def niah_multi_key(seed: int, index: int, *, memory_tokens: int = DEFAULT_MEMORY_TOKENS,
                   length_fn: LengthFn | None = None, min_doc_tokens: int = DEFAULT_MIN_DOC_TOKENS,
                   max_doc_tokens: int = DEFAULT_MAX_DOC_TOKENS, max_docs: int | None = None,
                   num_keys: int = 4, align_to: int = 0, card_distractors: float = 0.0
                   ) -> Record:
  """`num_keys` needles with different keys in different documents; asks one key's value."""
  return _niah("niah_multi_key", seed, index, num_keys, 1, False, memory_tokens, length_fn,
               min_doc_tokens, max_doc_tokens, max_docs, align_to, card_distractors)


def niah_multi_value(seed: int, index: int, *, memory_tokens: int = DEFAULT_MEMORY_TOKENS,
                     length_fn: LengthFn | None = None,
                     min_doc_tokens: int = DEFAULT_MIN_DOC_TOKENS,
                     max_doc_tokens: int = DEFAULT_MAX_DOC_TOKENS, max_docs: int | None = None,
                     num_values: int = 4, align_to: int = 0, card_distractors: float = 0.0
                     ) -> Record:
  """One key with `num_values` values in different documents; the answer is every value, in
  document order, joined by ", "; one retrieval step with every needle document."""
  return _niah("niah_multi_value", seed, index, num_values, num_values, True, memory_tokens,
               length_fn, min_doc_tokens, max_doc_tokens, max_docs, align_to, card_distractors)


def niah_multi_query(seed: int, index: int, *, memory_tokens: int = DEFAULT_MEMORY_TOKENS,
                     length_fn: LengthFn | None = None,
                     min_doc_tokens: int = DEFAULT_MIN_DOC_TOKENS,
                     max_doc_tokens: int = DEFAULT_MAX_DOC_TOKENS, max_docs: int | None = None,
                     num_queries: int = 4, align_to: int = 0, card_distractors: float = 0.0
                     ) -> Record:
  """`num_queries` keys (each in its own document) asked in one question; the answer lists their
  values in the question's order, joined by ", "; one retrieval step with every needle document."""
  if num_queries < 2:
    raise ValueError(f"niah_multi_query: num_queries must be at least 2, got {num_queries}")
  return _niah("niah_multi_query", seed, index, num_queries, num_queries, False, memory_tokens,
               length_fn, min_doc_tokens, max_doc_tokens, max_docs, align_to, card_distractors)


TASKS: dict[str, Callable[..., Record]] = {
    "fact_lookup": fact_lookup,
    "multi_hop": multi_hop,
    "niah_single": niah_single,
    "niah_multi_key": niah_multi_key,
    "niah_multi_value": niah_multi_value,
    "niah_multi_query": niah_multi_query,
}


def generate(task: str, seed: int, index: int, **params) -> Record:
  """Record `index` of task `task` under `seed` (see `TASKS` for the tasks and their params)."""
  if task not in TASKS:
    raise ValueError(f"unknown synthetic task {task!r}; known: {', '.join(TASKS)}")
  return TASKS[task](seed, index, **params)


@functools.lru_cache(maxsize=None)
def _task_params(task: str) -> frozenset[str]:
  return frozenset(inspect.signature(TASKS[task]).parameters) - {"seed", "index"}


def pick_task(weights: dict[str, float], seed: int, index: int) -> str:
  """The task of record `index` in a mix: drawn with probabilities proportional to `weights`
  (tasks taken in name order, so the dict's order does not matter)."""
  unknown = [t for t in weights if t not in TASKS]
  if unknown:
    raise ValueError(f"unknown synthetic task(s) {unknown} in weights; known: {', '.join(TASKS)}")
  names = sorted(weights)
  w = np.array([float(weights[t]) for t in names], dtype=np.float64)
  if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
    raise ValueError(f"mix weights must be non-negative and finite with a positive sum: {weights}")
  u = _rng("mix", seed, index).random()
  cum = np.cumsum(w / w.sum())
  return names[min(int(np.searchsorted(cum, u, side="right")), len(names) - 1)]


def generate_mix(weights: dict[str, float], seed: int, index: int, **params) -> Record:
  """Record `index` of a task mix: `pick_task` chooses the task, which gets the params it takes
  (a param no task of the mix takes is an error)."""
  accepted = set().union(*(_task_params(t) for t in weights if t in TASKS))
  stray = sorted(set(params) - accepted)
  if stray:
    raise TypeError(f"no task of the mix takes the parameter(s) {stray}")
  task = pick_task(weights, seed, index)
  return generate(task, seed, index, **{k: v for k, v in params.items() if k in _task_params(task)})
