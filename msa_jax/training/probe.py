"""The teacher-forced probe: how well a memory QA model predicts each kind of target token.

Every step's sample of held-out records (`msa_jax.data.transcript`) is scored teacher-forced; per
target token the probe keeps whether the argmax is the label and the label's log-probability, and
reports both per class:
- `id_digits`: the digits of the `[n]` ids a retrieval step writes;
- `answer`: the tokens of the final answer value (a token straddling it, like ` blue` after `is:`,
  counts as answer);
- `decision`: the first target token of a step, `[` (retrieve) or `<End-of-Retrieve>` (stop and
  answer): whether the model asks for more documents where it should;
- `format`: every other target token (brackets, `<|object_ref_end|>`, the answer prefix,
  `<|im_end|>`).
Classes come from the character offsets of each piece tokenized exactly as transcript.py tokenizes
it, checked against the sample's ids, never from token ids alone.

Three conditions, each over every step, reported per step kind (`retrieval` steps; `after_miss`,
the retrieval steps right after a miss round, `Record.misses`, which must retrieve again; the
`answer` step):
- `normal`: the sample as trained;
- `gold_text_appended`: the step's gold documents injected as text (`[i]. text\\n
  <|object_ref_end|>`, not routing) after the context, just before the target. The answer step's
  transcript already holds every hop's gold text, so there it equals `normal`. This measures
  copying from the context alone (a retrieval step's `decision` here is not meaningful: with
  the gold text already given, stopping is a fair guess);
- `gold_forced`: the step's gold documents forced into every router layer's top-k (`ForcedView`):
  id reading and answer copying from memory with router errors taken out.
Also: router recall@1 per router layer (the router's own scores) and, per condition, how often
every gold document was in a layer's selection. For the id digits, per condition and step kind:
the accuracy by the digit's place in its id (`id_digits_by_place`: do the first digits read and
the later ones not?) and the share of steps whose every id digit is the argmax (`ids_exact`, the
teacher-forced bound of writing the whole id set).

Each record's memory is encoded once (`encode_memory`) and every condition's prompts are prefilled
over it. Encode + prefill equals the training forward (a DESIGN.md invariant; the probe's tests
compare it with the training forward), and the memory stream is the costly part.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from msa_jax.data import prompt_format as pf
from msa_jax.data.batch_builder import Sample, build_batch, build_memory_batch
from msa_jax.data.records import Record
from msa_jax.data.tokenizer import Tokenizer
from msa_jax.data.transcript import (follows_miss, num_steps, record_step_sample,
                                     retrieval_context, retrieval_hop)
from msa_jax.model import entry_points
from msa_jax.model.forced_view import ForcedView
from msa_jax.model.memory_view import MemoryView
from msa_jax.model.model import MSAForCausalLM
from msa_jax.training.losses import selection_recall

CONDITIONS = ("normal", "gold_text_appended", "gold_forced")
STEP_KINDS = ("retrieval", "after_miss", "answer")
CLASSES = ("format", "id_digits", "answer", "decision")
FORMAT, ID_DIGITS, ANSWER, DECISION = range(len(CLASSES))
NORMAL, APPENDED, FORCED = range(len(CONDITIONS))
MAX_ID_PLACES = 8  # id digits tallied by place up to this; later places count in the last
_PROMPT_MULTIPLE = 256  # prompt rows are padded to a multiple of this: few shapes, few compilations
_ROUND_ID = re.compile(r"\[(\d+)\]")


def _piece(tokenizer: Tokenizer, text: str, target: bool, spans=()):
  """(ids, classes) of one piece: a target token takes the class of the span it overlaps, else
  format; a token that is no target gets -1."""
  ids, offsets = tokenizer.encode_with_offsets(text)
  classes = []
  for a, b in offsets:
    hit = [c for c, (s, e) in spans if a < e and s < b]
    classes.append((hit[0] if hit else FORMAT) if target else -1)
  return ids, classes


def target_classes(record: Record, step: int, sample: Sample, tokenizer: Tokenizer) -> np.ndarray:
  """The class (index into CLASSES; -1: no target) of each answer token of `sample`, the step's
  `record_step_sample`. Its pieces are rebuilt as transcript.py builds them and must give the
  sample's ids and target flags."""
  hop = retrieval_hop(record, step)
  if hop is not None:
    ids = [record.doc_ids[i] for i in record.hops[hop]]
    text = pf.round_ids(ids)
    found = list(_ROUND_ID.finditer(text))
    if [int(m.group(1)) for m in found] != ids:
      raise ValueError(f"round text {text!r} does not spell the ids {ids}")
    pieces = [_piece(tokenizer, text, True, [(ID_DIGITS, m.span(1)) for m in found])]
  else:
    final = pf.final_answer(record.answer)
    start = len(pf.ANSWER_PREFIX)
    if not final.startswith(pf.ANSWER_PREFIX + record.answer):
      raise ValueError(f"final answer {final!r} does not start with the prefix and the answer")
    pieces = [_piece(tokenizer, pf.END_OF_RETRIEVE, True),
              _piece(tokenizer, pf.restatement(record.question), False),
              _piece(tokenizer, final, True, [(ANSWER, (start, start + len(record.answer)))])]
  ids = [i for p in pieces for i in p[0]]
  classes = np.array([c for p in pieces for c in p[1]], np.int32)
  classes[np.flatnonzero(classes >= 0)[:1]] = DECISION
  targets = list(sample.answer_target) or [True] * len(sample.answer)
  if ids != list(sample.answer) or [c >= 0 for c in classes] != targets:
    raise ValueError(f"step {step} of {record.question!r}: the probe's pieces no longer match "
                     f"the transcript's sample (update target_classes with transcript.py)")
  return classes


def append_gold_text(record: Record, step: int, sample: Sample, tokenizer: Tokenizer) -> Sample:
  """`sample` (the step's) with the step's gold documents injected, not routing, before the target;
  the answer step unchanged (its transcript already holds them)."""
  hop = retrieval_hop(record, step)
  if hop is None:
    return sample
  entries = [(record.doc_ids[i], record.documents[i]) for i in record.hops[hop]]
  extra = retrieval_context([((), entries)], tokenizer)
  return dataclasses.replace(sample, context=list(sample.context) + extra.ids,
                             context_route=list(sample.context_route) + [False] * len(extra.ids),
                             context_target=list(sample.context_target) + extra.injected)


def class_grid(sample: Sample, classes: np.ndarray, seq_len: int) -> np.ndarray:
  """`classes` placed where `build_batch` puts the sample's labels in a prompt row of `seq_len`."""
  grid = np.full(seq_len, -1, np.int32)
  answer_start = sample.prompt_len - len(sample.answer)
  grid[answer_start - 1:sample.prompt_len - 1] = classes
  return grid


@dataclasses.dataclass(frozen=True)
class _Item:
  """One prompt row: over memory row `row` of its group, a step of kind `kind` standing for
  `conditions` (the answer step's normal and gold-text-appended rows are one row)."""

  row: int
  kind: int
  conditions: tuple[int, ...]
  sample: Sample
  classes: np.ndarray


def _items(record: Record, row: int, tokenizer: Tokenizer, align_to: int) -> list[_Item]:
  out = []
  for step in range(num_steps(record)):
    kind = STEP_KINDS.index("answer" if retrieval_hop(record, step) is None else
                            "after_miss" if follows_miss(record, step) else "retrieval")
    sample = record_step_sample(record, step, tokenizer, align_to=align_to)
    classes = target_classes(record, step, sample, tokenizer)
    appended = append_gold_text(record, step, sample, tokenizer)
    if appended is sample:
      out.append(_Item(row, kind, (NORMAL, APPENDED), sample, classes))
    else:
      out += [_Item(row, kind, (NORMAL,), sample, classes),
              _Item(row, kind, (APPENDED,), appended, classes)]
    out.append(_Item(row, kind, (FORCED,), sample, classes))
  return out


@functools.partial(jax.jit, static_argnums=0)
def _score(model: MSAForCausalLM, params, view: MemoryView, rows, forced, prompt):
  """Per prompt row (over memory row `rows[i]` of `view`, documents `forced` [R, D] forced into
  the selection): the label's log-probability and whether the argmax hits it, [R, S] each, and
  the routing."""
  layers = jax.tree.map(lambda x: x[:, rows], view.layers)
  logits, out = entry_points.prefill(model, params, prompt,
                                     ForcedView(MemoryView(layers, view.router_layers), forced))
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  labels = jnp.maximum(prompt.labels, 0)
  label_logp = jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  return label_logp, jnp.argmax(logits, axis=-1) == labels, out.selection


class _Tally:
  """Sums per (condition, step kind, class) and per router layer."""

  def __init__(self, num_layers: int):
    shape = (len(CONDITIONS), len(STEP_KINDS), len(CLASSES))
    self.logp, self.correct, self.count = np.zeros(shape), np.zeros(shape), np.zeros(shape, int)
    self.gold_selected = np.zeros((len(CONDITIONS), len(STEP_KINDS), num_layers))
    self.rows = np.zeros((len(CONDITIONS), len(STEP_KINDS)), int)
    self.recall = np.zeros((len(STEP_KINDS), num_layers))
    self.place_correct = np.zeros((len(CONDITIONS), len(STEP_KINDS), MAX_ID_PLACES))
    self.place_count = np.zeros((len(CONDITIONS), len(STEP_KINDS), MAX_ID_PLACES), int)
    self.ids_exact = np.zeros((len(CONDITIONS), len(STEP_KINDS)))
    self.id_rows = np.zeros((len(CONDITIONS), len(STEP_KINDS)), int)

  def add(self, item: _Item, grid, logp, correct, selected, recall1) -> None:
    gold = selected[:, list(item.sample.positive_docs)].all(axis=-1)
    digits = np.flatnonzero(grid == ID_DIGITS)
    places = id_digit_places(digits)
    for c in item.conditions:
      if digits.size:
        np.add.at(self.place_correct[c, item.kind], places, correct[digits])
        np.add.at(self.place_count[c, item.kind], places, 1)
        self.ids_exact[c, item.kind] += correct[digits].all()
        self.id_rows[c, item.kind] += 1
      for k in range(len(CLASSES)):
        m = grid == k
        self.logp[c, item.kind, k] += logp[m].sum()
        self.correct[c, item.kind, k] += correct[m].sum()
        self.count[c, item.kind, k] += m.sum()
      self.gold_selected[c, item.kind] += gold
      self.rows[c, item.kind] += 1
    if NORMAL in item.conditions:
      self.recall[item.kind] += recall1

  def summary(self, router_layers: Sequence[int]) -> dict:
    def stats(logp, correct, count):
      return {"count": int(count), "accuracy": float(correct / count) if count else None,
              "mean_logprob": float(logp / count) if count else None}

    def per_layer(values, n):
      return {f"layer{l}": float(v / n) if n else None for l, v in zip(router_layers, values)}

    metrics, gold = {}, {}
    for c, cond in enumerate(CONDITIONS):
      metrics[cond], gold[cond] = {}, {}
      for k, kind in enumerate(STEP_KINDS):
        entry = {cls: stats(self.logp[c, k, j], self.correct[c, k, j], self.count[c, k, j])
                 for j, cls in enumerate(CLASSES)}
        entry["all"] = stats(self.logp[c, k].sum(), self.correct[c, k].sum(),
                             self.count[c, k].sum())
        metrics[cond][kind] = entry
        gold[cond][kind] = per_layer(self.gold_selected[c, k], self.rows[c, k])
    recall = {kind: per_layer(self.recall[k], self.rows[NORMAL, k])
              for k, kind in enumerate(STEP_KINDS)}
    places = {cond: {kind: [float(a / n) for a, n in zip(self.place_correct[c, k],
                                                         self.place_count[c, k]) if n]
                     for k, kind in enumerate(STEP_KINDS) if self.id_rows[c, k]}
              for c, cond in enumerate(CONDITIONS)}
    exact = {cond: {kind: float(self.ids_exact[c, k] / self.id_rows[c, k])
                    for k, kind in enumerate(STEP_KINDS) if self.id_rows[c, k]}
             for c, cond in enumerate(CONDITIONS)}
    return {"metrics": metrics, "router_recall@1": recall, "gold_in_selection": gold,
            "id_digits_by_place": places, "ids_exact": exact,
            "samples": {kind: int(self.rows[NORMAL, k]) for k, kind in enumerate(STEP_KINDS)}}


def id_digit_places(digits: np.ndarray) -> np.ndarray:
  """The place of each id digit in its id (0: the first digit), given the sorted positions of a
  row's id digits: an id is a run of consecutive positions (ids are separated by brackets);
  places past MAX_ID_PLACES - 1 count in the last."""
  if not digits.size:
    return digits
  starts = np.concatenate([[True], np.diff(digits) > 1])
  first = np.maximum.accumulate(np.where(starts, np.arange(digits.size), 0))
  return np.minimum(np.arange(digits.size) - first, MAX_ID_PLACES - 1)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def probe(model: MSAForCausalLM, params, tokenizer: Tokenizer, records: Sequence[Record], *,
          batch_size: int = 16, rows_per_prefill: int = 16,
          progress: Callable[[int, int], None] | None = None) -> dict:
  """The probe's numbers over `records` (see the module docstring), scored `batch_size` records
  at a time in prefills of `rows_per_prefill` prompts of similar length.

  Memories are encoded one at a time: the blockwise attention skips tiles by ranges taken over
  the batch, so rows of differently placed documents would share (and compute) each other's tiles.
  """
  if not records:
    raise ValueError("the probe needs at least one record")
  msa, vocab = model.msa, model.config.vocab_size
  groups = [records[i:i + batch_size] for i in range(0, len(records), batch_size)]
  items = [[it for row, r in enumerate(g) for it in _items(r, row, tokenizer, msa.doc_align_to)]
           for g in groups]
  samples = [it.sample for g in items for it in g]
  seq_len_mem = _round_up(max(s.memory_len for s in samples), 256)
  max_docs = max(len(s.documents) for s in samples)
  build = dict(seq_len_mem=seq_len_mem, max_docs=max_docs, chunk_size=msa.chunk_size,
               pad_id=tokenizer.pad_id, vocab_size=vocab)
  head = jnp.asarray(tokenizer.encode(pf.TEMPLATE_HEAD), jnp.int32)
  encode = jax.jit(entry_points.encode_memory, static_argnums=0)
  tally = _Tally(len(msa.router_layers))
  done = 0
  for group, group_items in zip(groups, items):
    documents = {it.row: it.sample.documents for it in group_items}  # the same in every step
    views = [encode(model, params, build_memory_batch([documents[row]], batch_rows=1, **build),
                    head).view for row in range(len(group))]
    view = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *views)
    num_cols = view.layers.chunk_doc.shape[-1]
    group_items = sorted(group_items, key=lambda it: it.sample.prompt_len)
    for start in range(0, len(group_items), rows_per_prefill):
      chunk = group_items[start:start + rows_per_prefill]
      padded = chunk + [chunk[0]] * (rows_per_prefill - len(chunk))
      seq_len_prompt = _round_up(chunk[-1].sample.prompt_len, _PROMPT_MULTIPLE)
      _, prompt = build_batch([it.sample for it in padded], seq_len_prompt=seq_len_prompt,
                              question_position=msa.question_position, **build)
      labels = np.zeros((rows_per_prefill, num_cols), np.int32)
      forced = np.zeros((rows_per_prefill, num_cols), bool)
      for i, it in enumerate(padded):
        labels[i, list(it.sample.positive_docs)] = 1
        forced[i] = (labels[i] > 0) & (FORCED in it.conditions)
      rows = np.array([it.row for it in padded], np.int32)
      logp, correct, selection = _score(model, params, view, rows, forced, prompt)
      selected = np.asarray(jax.vmap(lambda s: s.mask(num_cols))(selection))  # [L, R, D]
      # recall counts the unforced (normal) rows only, whose selection is the router's top-k
      recall1 = np.asarray(selection_recall(selection, jnp.asarray(labels > 0), ns=(1,),
                                            per_sample=True)["recall@1"])
      logp, correct = jax.device_get((logp, correct))
      for i, it in enumerate(chunk):
        grid = class_grid(it.sample, it.classes, seq_len_prompt)
        tally.add(it, grid, logp[i], correct[i], selected[:, i], recall1[:, i])
    done += len(group)
    if progress:
      progress(done, len(records))
  result = tally.summary(msa.router_layers)
  result["records"] = len(records)
  return result


def format_table(result: dict) -> str:
  """The probe's numbers as a plain-text table."""
  lines = [f"{'condition':<19} {'step':<10} {'class':<9} {'count':>6} {'accuracy':>8} "
           f"{'logprob':>8}"]
  fmt = lambda v: "-" if v is None else f"{v:.3f}"
  for cond, kinds in result["metrics"].items():
    for kind, classes in kinds.items():
      for cls, s in classes.items():
        if s["count"] or cls == "all":
          lines.append(f"{cond:<19} {kind:<10} {cls:<9} {s['count']:>6} {fmt(s['accuracy']):>8} "
                       f"{fmt(s['mean_logprob']):>8}")
  layers = list(result["router_recall@1"]["retrieval"])
  lines.append(f"{'router':<30} " + " ".join(f"{l:>8}" for l in layers))
  for kind, per in result["router_recall@1"].items():
    lines.append(f"{'recall@1':<19} {kind:<10} " + " ".join(f"{fmt(v):>8}" for v in per.values()))
  for cond, kinds in result["gold_in_selection"].items():
    for kind, per in kinds.items():
      lines.append(f"{'gold selected':<19} {kind:<10} " + " ".join(f"{fmt(v):>8}"
                                                                 for v in per.values())
                   + f"  ({cond})")
  for cond, kinds in result["id_digits_by_place"].items():
    for kind, per in kinds.items():
      lines.append(f"{'id digit by place':<19} {kind:<10} " + " ".join(f"{v:>6.3f}" for v in per)
                   + f"  ids exact {result['ids_exact'][cond][kind]:.3f} ({cond})")
  return "\n".join(lines)
