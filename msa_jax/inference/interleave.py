"""Memory Interleave (paper §3.4, MSA_REFERENCE_IMPL.md §5): multi-round generative retrieval over
a memory, on token ids.

Each round the model reads `[head][question][tail][transcript]` and writes document ids,
`[i][k]<|object_ref_end|>`; the driver appends `[i]. text_i\\n[k]. text_k\\n<|object_ref_end|>` for
the ids the memory knows (unknown ids are ignored and reported) and prefills again, routing on the
question plus the newest injected documents. When the model writes `<End-of-Retrieve>` the driver
appends the question restatement and the model writes `The answer to the question is: …<|im_end|>`.
The contexts come from `transcript.prompt_pieces` / `retrieval_context`, the code that builds the
training samples, so the context of round h is the training sample's context of step h.

Questions advance together: each round is one `generate_fn` call for every question still active.
A question ends when it answers, when it has asked for documents in `max_rounds` rounds
(`round_cap`), when a round runs out of tokens without ending (`no_stop`), or when its context would
pass `max_context_tokens` (`context_full`).

With `routed_ids` a retrieval round writes one id among the documents its prefill selected in any
router layer, or `<End-of-Retrieve>`, by the model's greedy logits under that constraint
(`routed_ids.py` says why); documents already injected for the question are not offered again.
With `routed_choices` = n only the n of them the router scored highest are offered: n = 1 leaves
the router to choose each round's document and the model to decide whether to retrieve again.

Router-only mode is for models not trained to write ids: the driver writes each round itself with
the documents the router scored highest (the largest score any router layer gave, documents already
injected skipped), then asks for the answer after `router_rounds` rounds.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol, Sequence

import numpy as np

from msa_jax.data import prompt_format as pf
from msa_jax.data import transcript
from msa_jax.data.tokenizer import ENDOFTEXT, IM_END, OBJECT_REF_END
from msa_jax.inference.requests import Generation, Request
from msa_jax.inference.routed_ids import AllowedFn

GenerateFn = Callable[[list[Request]], list[Generation]]
# (requests, per request the allowed token sequences for its routing) -> generations
RetrieveFn = Callable[[list[Request], list[AllowedFn]], list[Generation]]


class DocumentStore(Protocol):
  """What the driver needs of a memory (a `memory.Bank` is one): its documents' display ids (by
  row, the rows routing returns) and texts. `index_of` is None for an id the memory lacks."""

  display_ids: Sequence[int]

  def index_of(self, display_id: int) -> int | None: ...

  def document_text(self, index: int) -> str: ...


class InMemoryDocuments:
  """A `DocumentStore` over texts held in memory (a record's documents, tests)."""

  def __init__(self, texts: Sequence[str], display_ids: Sequence[int] | None = None):
    self.texts = list(texts)
    self.display_ids = list(range(len(texts)) if display_ids is None else display_ids)
    if len(self.display_ids) != len(self.texts):
      raise ValueError(f"{len(self.display_ids)} display ids for {len(self.texts)} documents")
    self._index = {d: i for i, d in enumerate(self.display_ids)}
    if len(self._index) != len(self.display_ids):
      raise ValueError("display ids repeat an id")

  def index_of(self, display_id: int) -> int | None:
    return self._index.get(display_id)

  def document_text(self, index: int) -> str:
    return self.texts[index]


@dataclasses.dataclass(frozen=True)
class InterleaveConfig:
  """max_rounds: retrieval rounds before a question that keeps asking is stopped; round_tokens /
  answer_tokens: new tokens allowed per retrieval round / for the answer; max_context_tokens: the
  longest request (context + new tokens) the model takes (None: no limit); router_only: the driver
  picks `router_docs` documents per round by router score for `router_rounds` rounds; routed_ids:
  retrieval rounds choose one id among the routed documents (needs the driver's `retrieve_fn`);
  routed_choices: with routed_ids, offer only that many of them, best router score first (0: all)."""

  max_rounds: int = 8
  round_tokens: int = 64
  answer_tokens: int = 64
  max_context_tokens: int | None = None
  router_only: bool = False
  router_rounds: int = 1
  router_docs: int = 1
  routed_ids: bool = False
  routed_choices: int = 0

  def __post_init__(self):
    for name in ("max_rounds", "round_tokens", "answer_tokens", "router_rounds", "router_docs"):
      if getattr(self, name) < 1:
        raise ValueError(f"InterleaveConfig.{name} must be at least 1, got {getattr(self, name)}")
    if self.routed_choices < 0:
      raise ValueError(f"InterleaveConfig.routed_choices must be >= 0 (0: every routed document), "
                       f"got {self.routed_choices}")
    if self.routed_choices and not self.routed_ids:
      raise ValueError("InterleaveConfig.routed_choices limits the routed_ids offer; set "
                       "routed_ids too")
    if self.routed_ids and self.router_only:
      raise ValueError("InterleaveConfig: routed_ids and router_only are two different retrieval "
                       "modes; choose one")
    if self.max_context_tokens is not None and self.max_context_tokens < 1:
      raise ValueError(f"InterleaveConfig.max_context_tokens must be positive, got "
                       f"{self.max_context_tokens}")


@dataclasses.dataclass(frozen=True)
class LayerTrace:
  """One router layer's selection in one round: display ids, best first, and router scores."""

  layer: int
  doc_ids: list[int]
  scores: list[float]


@dataclasses.dataclass(frozen=True)
class RoundTrace:
  """One prefill + generation. phase: "retrieve" or "answer"; ids: the ids written (in router-only
  mode, those the driver wrote); unknown_ids: written ids the memory lacks; injected_ids: the
  documents appended after the round."""

  round: int
  phase: str
  tokens: list[int]
  text: str
  ids: list[int]
  unknown_ids: list[int]
  injected_ids: list[int]
  routing: list[LayerTrace]

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class InterleaveResult:
  """status: "answered", "answer_truncated" (the answer hit answer_tokens), "round_cap",
  "no_stop", "context_full"; context: the final transcript's token ids (without the answer)."""

  question: str
  answer: str
  status: str
  rounds: list[RoundTrace]
  context: list[int]

  @property
  def retrieved_ids(self) -> list[int]:
    """Every id written in the retrieval rounds, in first-written order, without repeats."""
    return list(dict.fromkeys(i for r in self.rounds if r.phase == "retrieve" for i in r.ids))

  def to_json(self) -> dict:
    return {"question": self.question, "answer": self.answer, "status": self.status,
            "retrieved_ids": self.retrieved_ids, "rounds": [r.to_json() for r in self.rounds]}


@dataclasses.dataclass
class _Question:
  """A question's state between rounds."""

  text: str
  head: list[int]
  question: list[int]
  tail: list[int]
  rounds: list[tuple[list[int], list[tuple[int, str]]]] = dataclasses.field(default_factory=list)
  answer_prefix: list[int] | None = None  # `<End-of-Retrieve>` + restatement, once retrieval ends
  trace: list[RoundTrace] = dataclasses.field(default_factory=list)
  injected: set[int] = dataclasses.field(default_factory=set)
  result: InterleaveResult | None = None


class InterleaveDriver:
  """Answers questions over one memory; see the module docstring. `tokenizer` is a `Tokenizer`
  (decoding keeps special tokens)."""

  def __init__(self, generate_fn: GenerateFn, tokenizer, documents: DocumentStore,
               config: InterleaveConfig = InterleaveConfig(),
               retrieve_fn: RetrieveFn | None = None):
    if config.routed_ids and retrieve_fn is None:
      raise ValueError("InterleaveConfig.routed_ids needs a retrieve_fn (e.g. "
                       "MemoryServer.driver's)")
    self.generate_fn, self.tokenizer, self.documents, self.config = (
        generate_fn, tokenizer, documents, config)
    self.retrieve_fn = retrieve_fn
    self.ref_end = tokenizer.token_id(OBJECT_REF_END)
    self.eos = {tokenizer.token_id(IM_END)}
    try:
      self.eos.add(tokenizer.token_id(ENDOFTEXT))
    except KeyError:
      pass
    self.end_of_retrieve = list(tokenizer.encode(pf.END_OF_RETRIEVE))
    single_eor = self.end_of_retrieve if len(self.end_of_retrieve) == 1 else []
    self.round_stops = tuple(sorted({self.ref_end, *self.eos, *single_eor}))
    self.answer_stops = tuple(sorted(self.eos))

  # -- contexts ------------------------------------------------------------------------------------

  def _request(self, q: _Question) -> Request:
    context = transcript.retrieval_context(q.rounds, self.tokenizer)
    tail = q.answer_prefix or []
    tokens = q.head + q.question + q.tail + context.ids + tail
    route = ([False] * len(q.head) + [True] * len(q.question) + [False] * len(q.tail) +
             context.route + [False] * len(tail))
    answering = q.answer_prefix is not None
    if self.config.router_only and not answering:
      budget, stops = 1, ()  # only the routing of the prefill is used
    elif answering:
      budget, stops = self.config.answer_tokens, self.answer_stops
    else:
      budget, stops = self.config.round_tokens, self.round_stops
    return Request(tokens=tokens, route_mask=route, max_new_tokens=budget, stop_ids=stops)

  def _fits(self, request: Request) -> bool:
    limit = self.config.max_context_tokens
    return limit is None or len(request.tokens) + request.max_new_tokens <= limit

  # -- one round -----------------------------------------------------------------------------------

  def _routing(self, routing) -> list[LayerTrace]:
    """A prefill's per-layer routing (`LayerRouting`s) in display ids."""
    out = []
    for lr in routing:
      rows = np.asarray(lr.doc_index).reshape(-1)
      scores = np.asarray(lr.scores, np.float64).reshape(-1)
      keep = rows >= 0
      out.append(LayerTrace(int(lr.layer), [int(self.documents.display_ids[int(i)])
                                             for i in rows[keep]],
                            [float(s) for s in scores[keep]]))
    return out

  def _known(self, ids: Sequence[int]) -> tuple[list[tuple[int, str]], list[int]]:
    """(display id, text) of the ids the memory holds, and the ids it does not."""
    entries, unknown = [], []
    for i in ids:
      index = self.documents.index_of(i)
      if index is None:
        unknown.append(i)
      else:
        entries.append((i, self.documents.document_text(index)))
    return entries, unknown

  def _finish(self, q: _Question, answer: str, status: str) -> None:
    context = transcript.retrieval_context(q.rounds, self.tokenizer).ids
    q.result = InterleaveResult(q.text, answer, status, q.trace,
                                q.head + q.question + q.tail + context + (q.answer_prefix or []))

  def _end_retrieval(self, q: _Question, written: list[int]) -> None:
    q.answer_prefix = written + transcript.restatement(q.text, self.tokenizer)

  def _eor_cut(self, tokens: list[int]) -> int | None:
    """The length of the shortest prefix of `tokens` that writes `<End-of-Retrieve>`, if any."""
    if pf.END_OF_RETRIEVE not in self.tokenizer.decode(tokens):
      return None
    return next(n for n in range(1, len(tokens) + 1)
                if pf.END_OF_RETRIEVE in self.tokenizer.decode(tokens[:n]))

  def _advance(self, q: _Question, g: Generation) -> None:
    tokens = [int(t) for t in g.tokens]
    text = self.tokenizer.decode(tokens)
    routing = self._routing(g.routing)
    number = len(q.trace)
    if q.answer_prefix is not None:
      q.trace.append(RoundTrace(number, "answer", tokens, text, [], [], [], routing))
      self._finish(q, pf.parse_answer(text), "answered" if g.stopped else "answer_truncated")
      return
    if self.config.router_only:
      self._router_round(q, routing, number)
      return
    cut = self._eor_cut(tokens)
    written = tokens if cut is None else tokens[:cut]
    ids = pf.parse_ids(self.tokenizer.decode(written))
    entries, unknown = self._known(ids)
    if cut is not None:  # retrieval ends; ids written before it in this round are not injected
      q.trace.append(RoundTrace(number, "retrieve", tokens, text, ids, unknown, [], routing))
      self._end_retrieval(q, written)
    elif g.stopped and tokens and tokens[-1] == self.ref_end:
      q.trace.append(RoundTrace(number, "retrieve", tokens, text, ids, unknown,
                                [i for i, _ in entries], routing))
      q.rounds.append((tokens, entries))
      if len(q.rounds) >= self.config.max_rounds:
        self._finish(q, "", "round_cap")
    elif g.stopped:  # an end-of-sequence token: the model answered without retrieving
      q.trace.append(RoundTrace(number, "answer", tokens, text, ids, unknown, [], routing))
      self._finish(q, pf.parse_answer(text), "answered")
    else:
      q.trace.append(RoundTrace(number, "retrieve", tokens, text, ids, unknown, [], routing))
      self._finish(q, "", "no_stop")

  def _allowed(self, q: _Question):
    """The routed-ids constraint of `q`'s next round: `[i]<|object_ref_end|>` for each document a
    router layer selected and not yet injected (the `routed_choices` best of them, if set), or
    `<End-of-Retrieve>`."""
    injected = {i for _, entries in q.rounds for i, _ in entries}
    limit = self.config.routed_choices or None

    def allowed(routing) -> list[list[int]]:
      ids = ranked_by_router(self._routing(routing), injected)[:limit]
      return [list(self.end_of_retrieve)] + [list(self.tokenizer.encode(pf.round_ids([d])))
                                             for d in sorted(ids)]
    return allowed

  def _generate(self, active: list[_Question], requests: list[Request]) -> list[Generation]:
    """One generation per request: retrieval rounds through `retrieve_fn` under `routed_ids`."""
    if not self.config.routed_ids:
      return self.generate_fn(requests)
    rounds = [j for j, q in enumerate(active) if q.answer_prefix is None]
    answers = [j for j, q in enumerate(active) if q.answer_prefix is not None]
    out: list[Generation | None] = [None] * len(requests)
    if rounds:
      gens = self.retrieve_fn([requests[j] for j in rounds],
                              [self._allowed(active[j]) for j in rounds])
      for j, g in zip(rounds, gens):
        out[j] = g
    if answers:
      for j, g in zip(answers, self.generate_fn([requests[j] for j in answers])):
        out[j] = g
    return out

  def _router_round(self, q: _Question, routing: list[LayerTrace], number: int) -> None:
    chosen = ranked_by_router(routing, q.injected)[:self.config.router_docs]
    written = list(self.tokenizer.encode(pf.round_ids(chosen))) if chosen else []
    q.trace.append(RoundTrace(number, "retrieve", written, self.tokenizer.decode(written), chosen,
                              [], chosen, routing))
    if chosen:  # routing only returns rows of the memory, so every chosen id is known
      q.rounds.append((written, self._known(chosen)[0]))
      q.injected.update(chosen)
    if len(q.rounds) >= self.config.router_rounds or not chosen:
      self._end_retrieval(q, list(self.end_of_retrieve))

  # -- the loop ------------------------------------------------------------------------------------

  def run(self, questions: Sequence[str]) -> list[InterleaveResult]:
    """One result per question, in order. A question whose first prompt does not fit
    `max_context_tokens` is a ValueError naming it (nothing is generated)."""
    if not questions:
      raise ValueError("no questions to answer")
    states = []
    for n, text in enumerate(questions):
      if not isinstance(text, str) or not text.strip():
        raise ValueError(f"question {n} is empty")
      states.append(_Question(text, *transcript.prompt_pieces(text, self.tokenizer)))
    for n, q in enumerate(states):
      request = self._request(q)
      if not self._fits(request):
        raise ValueError(
            f"question {n} ({q.text[:60]!r}) needs {len(request.tokens)} prompt tokens + "
            f"{request.max_new_tokens} new tokens, more than max_context_tokens="
            f"{self.config.max_context_tokens}")
    while True:
      active = [q for q in states if q.result is None]
      requests = []
      for q in list(active):
        request = self._request(q)
        if self._fits(request):
          requests.append(request)
        else:
          self._finish(q, "", "context_full")
          active.remove(q)
      if not active:
        break
      generations = self._generate(active, requests)
      if len(generations) != len(requests):
        raise RuntimeError(f"generate_fn returned {len(generations)} generations for "
                           f"{len(requests)} requests")
      for q, g in zip(active, generations):
        self._advance(q, g)
    return [q.result for q in states]


def ranked_by_router(routing: Sequence[LayerTrace], exclude) -> list[int]:
  """The documents any router layer selected, minus `exclude`, by the largest score a layer gave
  them, best first."""
  best: dict[int, float] = {}
  for layer in routing:
    for d, s in zip(layer.doc_ids, layer.scores):
      if d not in exclude:
        best[d] = max(s, best.get(d, -np.inf))
  return sorted(best, key=lambda d: -best[d])
