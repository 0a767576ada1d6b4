"""Where the demo's answers go wrong, from the rounds its report records: the router's top-1 per
hop, and what happened to each multi-hop question.

Per hop j of a question whose first j rounds injected its first j gold documents: is the document
the router ranks first at round j (`ranked_by_router`, injected ones left out: what router-picked
rounds inject) the gold one? A chain of h hops needs all h, so these rates compound. Multi-hop
outcomes: right; wrong with exactly the gold chain injected (reading); stopped early or overshot
on a correct prefix (deciding when to stop); or a hop routed wrongly. The demo's questions have one
gold document per hop, in `gold_ids` order; that is what this reads.
"""

from __future__ import annotations

from typing import Sequence

from msa_jax.inference.interleave import LayerTrace, ranked_by_router

OUTCOMES = ("right", "gold chain, wrong answer", "stopped early", "overshot", "routed wrong")


def _router_first(round_trace: dict, exclude: set[int]) -> int | None:
  layers = [LayerTrace(t.get("layer", -1), t["doc_ids"], t["scores"])
            for t in round_trace["routing"]]
  ranked = ranked_by_router(layers, exclude)
  return ranked[0] if ranked else None


def hop_top1(records: Sequence[dict]) -> dict[str, list[int]]:
  """`task/hop` -> [router top-1 right, rounds counted], over rounds on a gold prefix."""
  out: dict[str, list[int]] = {}
  for r in records:
    gold, got = r["gold_ids"], r["retrieved_ids"]
    for j, rd in enumerate(t for t in r["rounds"] if t["phase"] == "retrieve"):
      if j >= len(gold) or got[:j] != gold[:j]:
        break
      cell = out.setdefault(f"{r['task']}/{j}", [0, 0])
      cell[0] += _router_first(rd, set(gold[:j])) == gold[j]
      cell[1] += 1
  return dict(sorted(out.items()))


def outcome(record: dict) -> str:
  """Which of `OUTCOMES` a question's answer and retrieved ids are."""
  gold, got = record["gold_ids"], record["retrieved_ids"]
  if record["exact_match"] == 1.0:
    return "right"
  if got == gold:
    return "gold chain, wrong answer"
  if gold[:len(got)] == got:
    return "stopped early"
  if got[:len(gold)] == gold:
    return "overshot"
  return "routed wrong"


def diagnose(records: Sequence[dict]) -> dict:
  """The per-hop router top-1 and the multi-hop outcomes of one memory's records."""
  multi = [outcome(r) for r in records if len(r["gold_ids"]) > 1]
  return {"hop_top1": hop_top1(records),
          "multi_hop_outcomes": {o: multi.count(o) for o in OUTCOMES if o in multi}}


def format_diagnosis(label: str, diagnosis: dict) -> str:
  hops = ", ".join(f"{k} {a}/{n}" for k, (a, n) in diagnosis["hop_top1"].items())
  outcomes = ", ".join(f"{n} {o}" for o, n in diagnosis["multi_hop_outcomes"].items())
  return f"{label}: router top-1 per hop: {hops or '-'}; multi-hop: {outcomes or '-'}"
