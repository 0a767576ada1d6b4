"""Memory QA metrics: answer exact match and token F1 (SQuAD-style normalisation), and retrieval
precision/recall/F1 of the written document ids against the gold ids (MSA_REFERENCE_IMPL.md §6:
the official evaluation scores the set of ids against the gold set and averages over queries)."""

from __future__ import annotations

import collections
import re
import string
from typing import Iterable, Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
  """Lower case, without punctuation or articles, whitespace collapsed: wording that should not
  decide a match."""
  text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
  return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
  """F1 of the normalised words shared (with multiplicity); two empty answers match."""
  pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
  if not pred or not ref:
    return float(pred == ref)
  common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred), common / len(ref)
  return 2 * precision * recall / (precision + recall)


def retrieval_prf(predicted: Iterable[int], gold: Iterable[int]) -> tuple[float, float, float]:
  """(precision, recall, F1) of the predicted id set against the gold id set; precision is 0
  when nothing was predicted."""
  pred, ref = set(predicted), set(gold)
  if not ref:
    raise ValueError("retrieval metrics need at least one gold id")
  hits = len(pred & ref)
  precision = hits / len(pred) if pred else 0.0
  recall = hits / len(ref)
  f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
  return precision, recall, f1


def score_answer(prediction: str, reference: str, predicted_ids: Sequence[int],
                 gold_ids: Sequence[int]) -> dict[str, float | None]:
  """Every metric of one question. Without gold ids (a question asked of no memory) there is no
  retrieval to score: its metrics are None, which `summarize` leaves out."""
  answer = {"exact_match": exact_match(prediction, reference),
            "token_f1": token_f1(prediction, reference)}
  if not gold_ids:
    return {**answer, **dict.fromkeys(RETRIEVAL_METRICS)}
  precision, recall, f1 = retrieval_prf(predicted_ids, gold_ids)
  return {**answer, "retrieval_precision": precision, "retrieval_recall": recall,
          "retrieval_f1": f1, "retrieval_exact": float(set(predicted_ids) == set(gold_ids))}


RETRIEVAL_METRICS = ("retrieval_precision", "retrieval_recall", "retrieval_f1", "retrieval_exact")
METRICS = ("exact_match", "token_f1") + RETRIEVAL_METRICS


def summarize(rows: Sequence[dict], keys: Sequence[str] = METRICS,
              group_by: str = "task") -> dict[str, dict[str, float]]:
  """Means of `keys` over all rows ("all") and per value of `group_by`; each group also counts
  its rows ("n"). A key missing or None in a row is left out of that key's mean."""
  if not rows:
    raise ValueError("no rows to summarize")
  groups: dict[str, list[dict]] = {"all": list(rows)}
  for row in rows:
    if row.get(group_by):
      groups.setdefault(str(row[group_by]), []).append(row)
  out = {}
  for name, members in groups.items():
    stats: dict[str, float] = {"n": len(members)}
    for key in keys:
      values = [row[key] for row in members if row.get(key) is not None]
      if values:
        stats[key] = float(np.mean(values))
    out[name] = stats
  return out


def format_table(summary: dict[str, dict[str, float]]) -> str:
  """`summarize`'s output as a text table: one row per group, one column per metric."""
  present = {k for stats in summary.values() for k in stats} - {"n"}
  columns = ["n"] + [k for k in METRICS if k in present] + sorted(present - set(METRICS))
  width = max(len(g) for g in summary)
  lines = [f"{'':<{width}}  " + "  ".join(f"{c:>{max(len(c), 6)}}" for c in columns)]
  for group, stats in summary.items():
    cells = []
    for c in columns:
      v = stats.get(c)
      text = "-" if v is None else (f"{int(v)}" if c == "n" else f"{v:.4f}")
      cells.append(f"{text:>{max(len(c), 6)}}")
    lines.append(f"{group:<{width}}  " + "  ".join(cells))
  return "\n".join(lines)
