"""Retrieval rounds constrained to the documents the router selected (a Memory Interleave option).

In a free round the model writes any id (`[i]<|object_ref_end|>`) or `<End-of-Retrieve>`. A small
model reads the leading digits of an id out of the pooled chunks before the last ones, so it often
writes an id next to the right one (`[585]` for `[587]`). Generative retrieval models decode ids
under a constraint to valid ids for this reason (a prefix tree over the id strings, as in DSI and
GENRE). Here the valid ids of a round are the documents its own prefill selected in any router
layer, the top-k the model attended to: the model still chooses among them, token by token, by
its own greedy logits, and may end retrieval instead. The official code decodes ids freely; this
is an option (`InterleaveConfig.routed_ids`), off by default.

The loop runs on the engine's public prefill and append, one appended token per step for the
whole batch; the prefix tree lives on the host (a round writes a handful of tokens).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from msa_jax.inference.requests import Generation, LayerRouting, Request

_END = -1  # the key of a finished sequence in a prefix-tree node


def prefix_tree(sequences: Sequence[Sequence[int]]) -> dict:
  """Nested dicts token -> node; a node holding `_END` ends an allowed sequence. A sequence that
  is a proper prefix of another is refused: the walk would not know where to stop."""
  root: dict = {}
  for seq in sequences:
    if not seq:
      raise ValueError("an allowed sequence is empty")
    node = root
    for t in seq:
      if _END in node:
        raise ValueError(f"allowed sequence {list(seq)} extends another one")
      node = node.setdefault(int(t), {})
    if node and _END not in node:
      raise ValueError(f"allowed sequence {list(seq)} is a prefix of another one")
    node[_END] = True
  return root


def constrained_pick(logits: np.ndarray, node: dict) -> int:
  """The allowed next token with the highest logit."""
  allowed = [t for t in node if t != _END]
  return allowed[int(np.argmax(logits[allowed]))]


AllowedFn = Callable[[list[LayerRouting]], list[list[int]]]


def generate_routed(engine, requests: Sequence[Request],
                    allowed: Sequence[AllowedFn]) -> list[Generation]:
  """One `Generation` per request: greedy decoding restricted to the token sequences
  `allowed[i](routing)` gives for request i's prefill routing. Batches of up to the engine's
  `max_batch`; each generation is one whole allowed sequence (`stopped` True). The engine's append
  refuses a sequence longer than the cache room the requests' `max_new_tokens` reserved."""
  results: list[Generation] = []
  for start in range(0, len(requests), engine.max_batch):
    batch = list(requests[start:start + engine.max_batch])
    state, routing = engine.prefill(batch)
    fns = allowed[start:start + engine.max_batch]
    nodes, written = [prefix_tree(f(r)) for f, r in zip(fns, routing)], [[] for _ in batch]
    while True:
      logits = np.asarray(jax.device_get(state.logits))
      step = []
      for i, node in enumerate(nodes):
        if node is None:
          step.append([])
          continue
        token = constrained_pick(logits[i], node)
        written[i].append(token)
        nodes[i] = None if _END in node[token] else node[token]
        step.append([token] if nodes[i] is not None else [])
      if all(n is None for n in nodes):
        break
      state = engine.append(state, step)
    results.extend(Generation(tokens=w, stopped=True, routing=r) for w, r in zip(written, routing))
  return results
