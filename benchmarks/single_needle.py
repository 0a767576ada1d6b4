"""RULER's single needle (S-NIAH) over a bank: each question is asked of a memory holding the
haystack and its own needle only.

The demo asks all of its needle questions of one memory that holds every needle, which is the
multi-key task (a needle among needles). S-NIAH puts one needle in a haystack. Encoding a 1M-token
haystack once per question is what makes it slow (minutes per question on CPU), and documents are
encoded independently of each other, so here the haystack is encoded into one bank, and each
question gets a copy of it with its needle appended (`encode_corpus(append=True)`): the memory
each question sees is exactly haystack + needle, at one haystack encode in all.

The memory is the demo's (`memory_pool`): fact cards of every person, then filler prose, with
the needles as gold documents, shuffled, with display ids 0..n-1; the haystack is that memory
without the needles (their display ids stay unused until a needle is appended with its own).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from typing import Callable

from benchmarks.demo import demo_interleave, describe_answer, retrieval_mode
from benchmarks.demo_diagnosis import hop_top1
from msa_jax import evaluation
from msa_jax.api import LoadedModel
from msa_jax.atomic_dir import write_json_and_chart
from msa_jax.data import prompt_format as pf
from msa_jax.data.synthetic import memory_pool
from msa_jax.data.transcript import document_length_fn
from msa_jax.formatting import format_duration
from msa_jax.inference import metrics, serving
from msa_jax.inference.interleave import InterleaveConfig
from msa_jax.inference.queries import Query
from msa_jax.memory.corpus import Document
from msa_jax.memory.encode import encode_corpus


@dataclasses.dataclass(frozen=True)
class NeedleSettings:
  memory_tokens: int = 1 << 20
  num_needle: int = 16
  seed: int = 31
  min_doc_tokens: int = 16
  max_doc_tokens: int = 64
  interleave: InterleaveConfig = demo_interleave()
  top_k_docs: int | None = 1  # as the demo (benchmarks/demo.py DemoSettings.top_k_docs)
  row_tokens: int = 1024
  batch_rows: int = 16


def run_single_needle(loaded: LoadedModel, settings: NeedleSettings, work_dir: str,
                      log: Callable[[str], None] = print) -> dict:
  """Encodes the haystack once, then asks each needle question of haystack + its needle; returns
  {"settings", "summary" (evaluation.summarize of the rows), "router_top1" (the needle ranked
  first by the router in the first round, per question), "records", timings}."""
  if loaded.tokenizer is None:
    raise ValueError("the needle benchmark needs the model's tokenizer")
  if settings.num_needle <= 0:
    raise ValueError(f"num_needle must be positive, got {settings.num_needle}")
  if settings.top_k_docs is not None:
    loaded = loaded.with_top_k_docs(settings.top_k_docs)
  tokenizer = loaded.tokenizer
  length = document_length_fn(tokenizer, loaded.msa_config.doc_align_to)
  pool = memory_pool.build_pool(
      settings.memory_tokens, num_single=0, num_multi=0, num_needle=settings.num_needle,
      seed=settings.seed, length_fn=length, min_doc_tokens=settings.min_doc_tokens,
      max_doc_tokens=settings.max_doc_tokens, align_to=loaded.msa_config.doc_align_to)
  memory = memory_pool.level(pool, settings.memory_tokens, seed=settings.seed, length_fn=length)
  needles = {memory.gold_ids(q)[0] for q in memory.questions}
  haystack = [Document(t, i) for t, i in zip(memory.texts, memory.display_ids) if i not in needles]
  haystack_tokens = sum(length(pf.wrap_document(d.display_id, d.text)) for d in haystack)
  os.makedirs(work_dir, exist_ok=True)
  work = tempfile.mkdtemp(prefix="needles_", dir=work_dir)
  try:
    base = os.path.join(work, "haystack")
    log(f"haystack: {len(haystack)} documents, {haystack_tokens} tokens; encoding once")
    start = time.perf_counter()
    encode_corpus(loaded.model, loaded.params, tokenizer, haystack, base,
                  row_tokens=settings.row_tokens, batch_rows=settings.batch_rows, log=log)
    encode_s = time.perf_counter() - start
    rows, start = [], time.perf_counter()
    for n, q in enumerate(memory.questions):
      (gold,) = memory.gold_ids(q)
      bank = os.path.join(work, f"question_{n}")
      shutil.copytree(base, bank)
      encode_corpus(loaded.model, loaded.params, tokenizer,
                    [Document(memory.texts[memory.display_ids.index(gold)], gold)], bank,
                    append=True, row_tokens=settings.row_tokens, batch_rows=1, log=lambda _: None)
      server = serving.open_server(loaded, bank, max_batch=1)
      query = Query(q.question, q.answer, (gold,), q.task)
      (row,) = evaluation.evaluate_interleave(server.driver(settings.interleave), [query],
                                              batch_size=1, log=None)["records"]
      shutil.rmtree(bank)
      rows.append(row)
      log(describe_answer(f"S-NIAH {n + 1}/{len(memory.questions)}", query, row))
      rate = (n + 1) / (time.perf_counter() - start)
      log(f"{n + 1}/{len(memory.questions)} questions, {rate:.3f}/s, ETA "
          f"{format_duration((len(memory.questions) - n - 1) / rate)}")
  finally:
    shutil.rmtree(work, ignore_errors=True)
  top1 = hop_top1(rows).get("niah_single/0", [0, 0])
  return {"settings": dataclasses.asdict(settings),
          "retrieval": retrieval_mode(settings.interleave, loaded.msa_config.top_k_docs),
          "memory_documents": len(haystack) + 1, "haystack_tokens": haystack_tokens,
          "encode_s": encode_s, "answer_s": time.perf_counter() - start,
          "summary": metrics.summarize(rows, metrics.METRICS),
          "router_top1": top1, "records": rows}


def format_summary(result: dict) -> str:
  s = result["summary"]["all"]
  right, asked = result["router_top1"]
  return (f"{result['retrieval']}\nS-NIAH over {result['memory_documents']} documents ({result['haystack_tokens']} "
          f"haystack tokens and the needle): answer EM {s['exact_match']:.3f}, generative retrieval (written ids = the "
          f"needle) {s['retrieval_exact']:.3f}, router top-1 {right}/{asked}, n={s['n']}")


def _plot(result: dict, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  s = result["summary"]["all"]
  right, asked = result["router_top1"]
  names = ["answer EM", "written ids = needle", "router top-1"]
  values = [s["exact_match"], s["retrieval_exact"], right / max(asked, 1)]
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  bars = ax.bar(names, values, color=["tab:blue", "tab:orange", "tab:green"])
  ax.bar_label(bars, labels=[f"{v:.2f}" for v in values])
  ax.set_ylim(0, 1.1)
  ax.set_title(f"S-NIAH, {s['n']} questions, each over {result['haystack_tokens']:,} haystack "
               f"tokens + its needle\n{result['retrieval']}", fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write_report(result: dict, out_dir: str) -> tuple[str, str]:
  """`single_needle.json` and `single_needle.png` in `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  return write_json_and_chart(result, os.path.join(out_dir, "single_needle.json"),
                              os.path.join(out_dir, "single_needle.png"), _plot)
