"""The memory demo: one set of single-hop and multi-hop questions asked of synthetic memories of
growing size (the paper's Figure 1 for our model), and of no memory at all.

For every size the memory (`memory_pool.level`: the questions' gold documents plus
distractors, shuffled, with fresh display ids) is encoded into its own bank, the questions are
answered together by Memory Interleave over it, and each answer is scored: answer exact match, and
retrieval accuracy (the ids the model wrote over all rounds are exactly the gold documents) with
retrieval recall. The same questions asked of zero documents (`serving.open_empty_server`) are the
baseline: answer EM there is what the model gets without its memory. The report holds every
question's rounds, each memory's `demo_diagnosis` (the router's top-1 per hop, multi-hop
outcomes), and a table of size vs accuracy that `write_report` saves as JSON and PNG.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import textwrap
import time
from typing import Callable

from benchmarks.demo_diagnosis import diagnose
from msa_jax import evaluation
from msa_jax.atomic_dir import write_json_and_chart
from msa_jax.api import LoadedModel
from msa_jax.data import prompt_format as pf
from msa_jax.data.synthetic import memory_pool
from msa_jax.data.transcript import document_length_fn
from msa_jax.inference import serving
from msa_jax.inference.interleave import InterleaveConfig
from msa_jax.inference.queries import Query
from msa_jax.memory.corpus import Document
from msa_jax.memory.encode import encode_corpus

COLUMNS = (("exact_match", "answer EM"), ("retrieval_exact", "retrieval acc"),
           ("retrieval_recall", "retrieval recall"))
NO_MEMORY = "none"  # the baseline's label


def demo_interleave(max_rounds: int = 8, *, router_only: bool = False,
                    routed_ids: bool | None = None,
                    routed_choices: int | None = None) -> InterleaveConfig:
  """The demo's retrieval: the official loop (the model writes the ids of each round, then
  `<End-of-Retrieve>` and the answer) unless `router_only`, `routed_ids` (router-picked rounds:
  the model writes one id among the routed documents, by default only the best one) or an
  explicit `routed_choices` asks otherwise (None: not given)."""
  if routed_ids is None:
    routed_ids = routed_choices is not None
  if routed_choices is None:
    routed_choices = 1 if routed_ids else 0
  return InterleaveConfig(max_rounds=max_rounds, router_only=router_only, routed_ids=routed_ids,
                          routed_choices=routed_choices)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
  sizes: tuple[int, ...] = (1 << 14, 1 << 16)  # with the baseline, ~1 minute on 2 CPU cores
  num_single: int = 8
  num_multi: int = 4
  num_needle: int = 0  # RULER-style single needles in the haystack part of the memory
  seed: int = 0
  min_doc_tokens: int = 16
  max_doc_tokens: int = 64  # 16-64: the document lengths the shipped model is retrained on
  interleave: InterleaveConfig = demo_interleave()
  # documents each router layer selects (None: the model's own k). The shipped tiny model, trained
  # with 4, writes a whole id right from one selected document (1.00 at 16K) but picks the
  # question's among 4 only about half the time (BENCHMARKS §18).
  top_k_docs: int | None = 1
  row_tokens: int = 1024
  batch_rows: int = 16
  batch_size: int = 1  # requests per prefill: bank routing holds [batch, prompt, chunks] scores
  memory_devices: int | None = None


def _label(tokens: int) -> str:
  for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
    if tokens >= scale and tokens % scale == 0:
      return f"{tokens // scale}{unit}"
  return str(tokens)


def retrieval_mode(config: InterleaveConfig, top_k_docs: int | None = None) -> str:
  """Which retrieval answered, for the table and the chart; `top_k_docs`: the documents each
  router layer selected, when named."""
  rounds = lambda n: f"{n} round" + "s" * (n != 1)
  selects = "" if top_k_docs is None else f", top {top_k_docs} per router layer"
  if config.router_only:
    return (f"router-only retrieval (top {config.router_docs} by router score, "
            f"{rounds(config.router_rounds)}{selects})")
  ids = ""
  if config.routed_ids:
    ids = (f", ids among the {config.routed_choices} best routed" if config.routed_choices
           else ", ids among the routed documents")
  return f"generative retrieval (Memory Interleave, up to {rounds(config.max_rounds)}{ids}{selects})"


def describe_answer(label: str, query: Query, row: dict) -> str:
  """One question's retrieval rounds and answer, as the demo prints them."""
  rounds = []
  for r in row["rounds"]:
    if r["phase"] == "retrieve":
      text = "".join(f"[{i}]" for i in r["ids"])
      text += f" (unknown: {r['unknown_ids']})" if r["unknown_ids"] else ""
      text += pf.END_OF_RETRIEVE if pf.END_OF_RETRIEVE in r["text"] else ""
      rounds.append(text or "(no ids)")
  mark = "right" if row["exact_match"] else "wrong"
  return (f"[{label}] {query.task}: {query.question}\n"
          f"    retrieved per round: {' -> '.join(rounds) or '(none)'}   gold: "
          f"{list(query.gold_ids)}\n"
          f"    answer: {row['prediction']!r} ({mark}; expected {query.answer!r}, "
          f"{row['status']})")


def _ask(server: serving.MemoryServer, queries: list[Query], settings: DemoSettings, label: str,
         log: Callable[[str], None]) -> dict:
  """Answers `queries` over the server's memory, logs each, and returns the scores and time."""
  start = time.perf_counter()
  result = evaluation.evaluate_interleave(server.driver(settings.interleave), queries,
                                         batch_size=len(queries), log=None)
  for q, row in zip(queries, result["records"]):
    log(describe_answer(label, q, row))
  return {"answer_s": time.perf_counter() - start, **result}


def run_demo(loaded: LoadedModel, settings: DemoSettings, work_dir: str,
             log: Callable[[str], None] = print) -> dict:
  """Asks the questions of no memory, then builds, encodes and questions every memory size;
  returns the report (see the module doc). Banks are written under `work_dir` and removed once
  evaluated."""
  if loaded.tokenizer is None:
    raise ValueError("the demo needs the model's tokenizer")
  if settings.top_k_docs is not None:
    loaded = loaded.with_top_k_docs(settings.top_k_docs)
  sizes = sorted(set(settings.sizes))
  if not sizes or sizes[0] <= 0:
    raise ValueError(f"memory sizes must be positive, got {settings.sizes}")
  tokenizer = loaded.tokenizer
  align_to = loaded.msa_config.doc_align_to
  length = document_length_fn(tokenizer, align_to)
  start = time.perf_counter()
  pool = memory_pool.build_pool(
      sizes[-1], num_single=settings.num_single, num_multi=settings.num_multi,
      num_needle=settings.num_needle, seed=settings.seed, length_fn=length,
      min_doc_tokens=settings.min_doc_tokens, max_doc_tokens=settings.max_doc_tokens,
      align_to=align_to)
  log(f"built a pool of {len(pool.documents)} documents ({pool.num_gold} gold) for "
      f"{len(pool.questions)} questions in {time.perf_counter() - start:.1f} s")
  log(f"no memory: the {len(pool.questions)} questions asked of 0 documents")
  no_memory = serving.open_empty_server(loaded, max_batch=settings.batch_size, fixed_batch=True)
  baseline = {"memory_tokens": 0, "label": NO_MEMORY, "documents": 0, "tokens": 0,
              **_ask(no_memory, [Query(q.question, q.answer, (), q.task) for q in pool.questions],
                     settings, NO_MEMORY, log)}
  os.makedirs(work_dir, exist_ok=True)
  levels = []
  for size in sizes:
    memory = memory_pool.level(pool, size, seed=settings.seed, length_fn=length)
    log(f"memory {_label(size)}: {len(memory.texts)} documents, {memory.tokens} tokens; encoding")
    bank_dir = tempfile.mkdtemp(prefix=f"bank_{_label(size)}_", dir=work_dir)
    try:
      bank = os.path.join(bank_dir, "bank")
      t0 = time.perf_counter()
      encode_corpus(loaded.model, loaded.params, tokenizer,
                    [Document(t, i) for t, i in zip(memory.texts, memory.display_ids)], bank,
                    row_tokens=settings.row_tokens, batch_rows=settings.batch_rows, log=log)
      encode_s = time.perf_counter() - t0
      queries = [Query(q.question, q.answer, tuple(memory.gold_ids(q)), q.task)
                 for q in memory.questions]
      server = serving.open_server(loaded, bank, memory_devices=settings.memory_devices,
                                   max_batch=settings.batch_size, fixed_batch=True)
      asked = _ask(server, queries, settings, _label(size), log)
    finally:
      shutil.rmtree(bank_dir, ignore_errors=True)
    levels.append({"memory_tokens": size, "label": _label(size), "documents": len(memory.texts),
                   "tokens": memory.tokens, "encode_s": encode_s,
                   "diagnosis": diagnose(asked["records"]), **asked})
  return {"settings": {**dataclasses.asdict(settings), "sizes": sizes},
          "top_k_docs": loaded.msa_config.top_k_docs,
          "retrieval": retrieval_mode(settings.interleave, loaded.msa_config.top_k_docs),
          "questions": len(pool.questions),
          "seconds": time.perf_counter() - start, "baseline": baseline, "levels": levels}


def format_table(report: dict) -> str:
  """The retrieval mode, then memory size vs accuracy, overall and per task; the no-memory
  baseline is the first row (it retrieves nothing, so its retrieval columns are "-")."""
  levels = [report["baseline"]] + report["levels"]
  tasks = sorted({t for lv in levels for t in lv["summary"] if t != "all"})
  header = ["memory", "docs"] + [name for _, name in COLUMNS] + [
      f"EM {t}" for t in tasks]
  rows = [header]
  for lv in levels:
    s = lv["summary"]
    rows.append([lv["label"], str(lv["documents"])] +
                [f"{s['all'][k]:.3f}" if k in s["all"] else "-" for k, _ in COLUMNS] +
                [f"{s[t]['exact_match']:.3f} (n={s[t]['n']})" if t in s else "-" for t in tasks])
  widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
  return "\n".join([report["retrieval"]] + [
      "  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows])


def _plot(report: dict, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  levels = report["levels"]
  x = [lv["tokens"] for lv in levels]
  fig, ax = plt.subplots(figsize=(6.0, 4.0))
  for key, name in COLUMNS:
    ax.plot(x, [lv["summary"]["all"].get(key, 0.0) for lv in levels], marker="o", label=name)
  ax.axhline(report["baseline"]["summary"]["all"]["exact_match"], color="gray", linestyle="--",
             label="answer EM, no memory")
  ax.set_xscale("log", base=2)
  ax.set_xticks(x, [lv["label"] for lv in levels])
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel("memory size (tokens)")
  ax.set_ylabel("fraction of questions")
  ax.set_title(f"Synthetic memories, {report['questions']} questions\n"
               + textwrap.fill(report["retrieval"], 70), fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(report: dict, out_dir: str) -> tuple[str, str]:
  """`demo.json` and `demo.png` in `out_dir`."""
  return write_json_and_chart(report, os.path.join(out_dir, "demo.json"),
                              os.path.join(out_dir, "demo.png"), _plot)
