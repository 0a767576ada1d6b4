"""The demo's diagnosis on hand-made report records: router top-1 per hop on gold prefixes only,
injected documents left out of the ranking, and each multi-hop outcome."""

from benchmarks import demo_diagnosis as dd


def _round(*layers, phase="retrieve"):
  return {"phase": phase, "routing": [{"doc_ids": list(d), "scores": list(s)} for d, s in layers]}


def _record(task, gold, got, em, rounds):
  return {"task": task, "gold_ids": gold, "retrieved_ids": got, "exact_match": em,
          "rounds": rounds}


RECORDS = [
    # single hop, router right by layer 2's score (the best any layer gave)
    _record("fact_lookup", [5], [5], 1.0, [_round(([7, 5], [0.9, 0.8]), ([5, 7], [0.95, 0.1])),
                                           _round(phase="answer")]),
    # single hop, a near-namesake wins
    _record("fact_lookup", [3], [4], 0.0, [_round(([4, 3], [0.97, 0.96]))]),
    # chain 1 -> 2 -> 6: hop 0 right, hop 1 right only once the injected 1 is left out, hop 2 wrong
    _record("multi_hop", [1, 2, 6], [1, 2, 8], 0.0,
            [_round(([1, 9], [0.9, 0.2])), _round(([1, 2], [0.99, 0.5])),
             _round(([8, 6], [0.7, 0.6])), _round(([8], [0.7]))]),
    # hop 0 wrong: the later rounds are not on a gold prefix, so they are not counted
    _record("multi_hop", [4, 5], [9, 5], 0.0, [_round(([9, 4], [0.8, 0.7])),
                                               _round(([5], [0.9]))]),
    _record("multi_hop", [1, 2], [1, 2], 0.0, [_round(([1], [0.9])), _round(([2], [0.9]))]),
    _record("multi_hop", [1, 2], [1], 0.0, [_round(([1], [0.9])), _round(([2], [0.9]))]),
    _record("multi_hop", [1, 2], [1, 2, 3], 1.0, [_round(([1], [0.9])), _round(([2], [0.9]))]),
    _record("multi_hop", [1, 2], [1, 2, 3], 0.0, [_round(([1], [0.9])), _round(([2], [0.9]))]),
]


def test_hop_top1_counts_gold_prefixes_only():
  assert dd.hop_top1(RECORDS) == {"fact_lookup/0": [1, 2], "multi_hop/0": [5, 6],
                                  "multi_hop/1": [5, 5], "multi_hop/2": [0, 1]}


def test_multi_hop_outcomes():
  assert [dd.outcome(r) for r in RECORDS[2:]] == [
      "routed wrong", "routed wrong", "gold chain, wrong answer", "stopped early", "right",
      "overshot"]
  diagnosis = dd.diagnose(RECORDS)
  assert diagnosis["multi_hop_outcomes"] == {"right": 1, "gold chain, wrong answer": 1,
                                             "stopped early": 1, "overshot": 1,
                                             "routed wrong": 2}
  line = dd.format_diagnosis("16K", diagnosis)
  assert line.startswith("16K: router top-1 per hop: fact_lookup/0 1/2, multi_hop/0 5/6")
  assert line.endswith("multi-hop: 1 right, 1 gold chain, wrong answer, 1 stopped early, "
                       "1 overshot, 2 routed wrong")
