"""The generation binaries end to end on the shipped tiny model (generate, eval, demo on a tiny
memory with its no-memory baseline), the synthetic demo memory's invariants, the demo's table and
chart, and clear errors for bad input: an empty query file, a bank encoded by another model, a
question longer than the model takes."""

import dataclasses
import json
import os
import socket

import jax
import pytest

import msa_jax
from benchmarks import demo, demo_diagnosis
from msa_jax.data.synthetic import memory_pool
from msa_jax.inference import metrics
from msa_jax.inference.interleave import InterleaveConfig
from msa_jax.inference.serving import open_server
from msa_jax.memory import BankError
from msa_jax.memory.corpus import Document
from msa_jax.memory.encode import encode_corpus
from tests.binary_runner import run_python
from tests.judge_fixtures import FakeJudgeServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "models", "tiny_msa")
MEMORY_TOKENS = 2048


@pytest.fixture(scope="module")
def loaded():
  return msa_jax.load(TINY)


def _length(loaded):
  return lambda text: len(loaded.tokenizer.encode(text))


@pytest.fixture(scope="module")
def memory(loaded):
  pool = memory_pool.build_pool(MEMORY_TOKENS, num_single=1, num_multi=1, seed=3,
                                     length_fn=_length(loaded), max_doc_tokens=64)
  return memory_pool.level(pool, MEMORY_TOKENS, seed=3, length_fn=_length(loaded))


@pytest.fixture(scope="module")
def bank(loaded, memory, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("bank") / "bank")
  encode_corpus(loaded.model, loaded.params, loaded.tokenizer,
                [Document(t, i) for t, i in zip(memory.texts, memory.display_ids)], path,
                row_tokens=512, batch_rows=4, log=lambda line: None)
  return path


@pytest.fixture(scope="module")
def query_file(memory, tmp_path_factory):
  path = tmp_path_factory.mktemp("queries") / "queries.jsonl"
  with open(path, "w") as f:
    for q in memory.questions:
      gold = memory.gold_ids(q)
      f.write(json.dumps({"documents": [memory.texts[i] for i in gold], "question": q.question,
                          "answer": q.answer, "task": q.task, "doc_ids": gold,
                          "positive_ids": [[gold.index(i) for i in hop] for hop in q.hops]}))
      f.write("\n")
  return str(path)


def _run(script, *args):
  return run_python([os.path.join(ROOT, "experiments", script), *args], cwd=os.getcwd(),
                    timeout=600, env={**os.environ, "PYTHONPATH": ROOT})


def test_synthetic_memory_levels(loaded):
  length = _length(loaded)
  pool = memory_pool.build_pool(8192, num_single=2, num_multi=2, seed=0, length_fn=length,
                                     max_doc_tokens=128)
  levels = memory_pool.levels(pool, [4096, 8192], seed=0, length_fn=length)
  small, large = levels
  gold_texts = [[pool.documents[i] for hop in q.hops for i in hop] for q in pool.questions]
  for level, size in zip(levels, (4096, 8192)):
    assert level.tokens == sum(length(f"<|im_start|>[{i}]. {t}[{i}]<|im_end|>")
                               for i, t in zip(level.display_ids, level.texts)) <= size
    assert level.display_ids == list(range(len(level.texts)))
    for q, texts in zip(level.questions, gold_texts):  # the gold documents, by their new ids
      assert [level.texts[i] for hop in q.hops for i in hop] == texts
    cards = [t.split(".", 1)[0] for t in level.texts if t.split(".", 1)[0].count(" ") == 1]
    assert len(cards) == len(set(cards))  # one card per person
  assert set(small.texts) < set(large.texts)
  assert [q.task for q in pool.questions] == ["fact_lookup"] * 2 + ["multi_hop"] * 2
  assert all(len(q.hops) >= 2 for q in pool.questions[2:])
  with pytest.raises(ValueError, match="cannot hold the"):
    memory_pool.level(pool, 256, seed=0, length_fn=length)


def test_eval_and_generate_binaries(bank, query_file, memory, tmp_path):
  out = tmp_path / "eval"
  result = _run("eval.py", f"--checkpoint={TINY}", f"--bank={bank}", f"--queries={query_file}",
                f"--out={out}", "--max_rounds=1", "--memory_devices=1")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "retrieval_precision" in result.stdout
  rows = json.loads((out / "results.json").read_text())["records"]
  assert (out / "summary.txt").read_text().strip() in result.stdout
  assert [r["question"] for r in rows] == [q.question for q in memory.questions]
  for row, q in zip(rows, memory.questions):
    assert row["gold_ids"] == memory.gold_ids(q)
    expected = metrics.score_answer(row["prediction"], q.answer, row["retrieved_ids"],
                                    row["gold_ids"])
    assert {k: row[k] for k in expected} == expected
    assert len([r for r in row["rounds"] if r["phase"] == "retrieve"]) <= 1
  answers = tmp_path / "answers.json"
  result = _run("generate.py", f"--checkpoint={TINY}", f"--bank={bank}", "--max_rounds=1",
                "--memory_devices=1", f"--question={memory.questions[1].question}",
                f"--out={answers}")
  assert result.returncode == 0, result.stderr[-3000:]
  (generated,) = json.loads(answers.read_text())
  # the same model, bank and greedy decoding: generate.py answers as eval.py did
  assert generated["answer"] == rows[1]["prediction"]
  assert generated["retrieved_ids"] == rows[1]["retrieved_ids"]
  assert f"answer: {generated['answer']!r}" in result.stdout
  assert f"round 0: ids {generated['rounds'][0]['ids']}" in result.stdout


def test_eval_keeps_its_answers_when_the_judge_is_down(bank, query_file, memory, tmp_path):
  with socket.socket() as s:  # a port nothing listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  out = tmp_path / "eval"
  args = [f"--checkpoint={TINY}", f"--bank={bank}", f"--queries={query_file}", f"--out={out}",
          "--max_rounds=1", "--memory_devices=1", "--judge_model=m"]
  result = _run("eval.py", *args, f"--judge_url=http://127.0.0.1:{port}/v1")
  n = len(memory.questions)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f"eval: {n} of {n} judgements failed (recorded in results.json); run the same command "
      f"again to retry them")
  rows = json.loads((out / "results.json").read_text())["records"]
  assert [r["question"] for r in rows] == [q.question for q in memory.questions]
  assert all("unreachable" in r["judge_error"] and r["judge_score"] is None for r in rows)
  server = FakeJudgeServer(["4"] * n)
  try:
    result = _run("eval.py", *args, f"--judge_url={server.url}")
  finally:
    server.close()
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resuming: {n} of {n} questions were answered by an earlier run" in result.stdout
  again = json.loads((out / "results.json").read_text())["records"]
  assert [r["prediction"] for r in again] == [r["prediction"] for r in rows]
  assert [(r["judge_score"], r["judge_error"]) for r in again] == [(4, None)] * n


def test_demo_binary_on_a_tiny_memory(tmp_path):
  result = _run("demo.py", "--memory_tokens=2048", "--sizes=", "--num_single=1",
                "--num_multi=1", "--max_rounds=1", "--max_doc_tokens=48", "--memory_devices=1",
                f"--out={tmp_path}")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "demo.json").read_text())
  assert (tmp_path / "demo.png").read_bytes().startswith(b"\x89PNG")
  assert report["settings"]["max_doc_tokens"] == 48
  assert [lv["label"] for lv in report["levels"]] == ["2K"]
  for lv in report["levels"]:
    assert lv["tokens"] <= lv["memory_tokens"] and len(lv["records"]) == 2
    for row in lv["records"]:
      assert f"{row['question']}\n" in result.stdout
    assert lv["diagnosis"] == demo_diagnosis.diagnose(lv["records"])
    assert demo_diagnosis.format_diagnosis(lv["label"], lv["diagnosis"]) in result.stdout
  # the baseline: the same questions over zero documents, so nothing is routed or injected
  baseline = report["baseline"]
  assert (baseline["label"], baseline["documents"], baseline["tokens"]) == ("none", 0, 0)
  questions = [row["question"] for row in report["levels"][0]["records"]]
  assert [row["question"] for row in baseline["records"]] == questions
  for row in baseline["records"]:
    assert row["gold_ids"] == [] and row["retrieval_exact"] is None
    for r in row["rounds"]:
      assert r["injected_ids"] == [] and all(layer["doc_ids"] == [] for layer in r["routing"])
      assert r["ids"] == r["unknown_ids"]
    assert f"[none] {row['task']}: {row['question']}\n" in result.stdout
  assert set(baseline["summary"]["all"]) == {"n", "exact_match", "token_f1"}
  assert report["retrieval"] == ("generative retrieval (Memory Interleave, up to 1 round, top 1 "
                                 "per router layer)")  # the demo's default: the official loop
  assert report["top_k_docs"] == 1
  for row in report["levels"][0]["records"]:  # one selected document per router layer
    assert all(len(layer["doc_ids"]) <= 1 for r in row["rounds"] for layer in r["routing"])
  table = result.stdout[result.stdout.index(report["retrieval"] + "\n"):]
  lines = table.splitlines()
  assert lines[1].split()[:5] == ["memory", "docs", "answer", "EM", "retrieval"]
  em = f"{baseline['summary']['all']['exact_match']:.3f}"
  assert lines[2].split()[:5] == ["none", "0", em, "-", "-"]
  assert lines[3].split()[:2] == ["2K", str(report["levels"][0]["documents"])]
  assert not [p for p in os.listdir(tmp_path) if p.startswith("bank_")]  # banks removed


def test_demo_chart_draws_the_baseline_and_names_the_retrieval(tmp_path, monkeypatch):
  import matplotlib.figure  # pylint: disable=import-outside-toplevel
  def level(label, tokens, em):
    return {"label": label, "tokens": tokens, "documents": tokens // 64,
            "summary": {"all": {"n": 4, "exact_match": em, "retrieval_exact": em,
                                "retrieval_recall": em}}}
  baseline = level("none", 0, 0.25)
  baseline["summary"]["all"] = {"n": 4, "exact_match": 0.25}
  mode = demo.retrieval_mode(InterleaveConfig(router_only=True, router_docs=2))
  report = {"retrieval": mode, "questions": 4, "baseline": baseline,
            "levels": [level("16K", 1 << 14, 1.0), level("64K", 1 << 16, 0.75)]}
  figures = []
  save = matplotlib.figure.Figure.savefig
  monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                      lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k)))
  json_path, png_path = demo.write_report(report, str(tmp_path))
  assert json.loads(open(json_path).read()) == report
  assert open(png_path, "rb").read().startswith(b"\x89PNG")
  (ax,) = figures[0].axes
  (dashed,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
  assert dashed.get_label() == "answer EM, no memory" and list(dashed.get_ydata()) == [0.25] * 2
  assert mode == "router-only retrieval (top 2 by router score, 1 round)"
  assert demo.retrieval_mode(InterleaveConfig(max_rounds=3), top_k_docs=1) == (
      "generative retrieval (Memory Interleave, up to 3 rounds, top 1 per router layer)")
  assert mode in ax.get_title()
  table = demo.format_table(report).splitlines()
  assert table[0] == mode and table[2].split() == ["none", "0", "0.250", "-", "-"]


def test_empty_query_file_is_a_clear_error(bank, tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  result = _run("eval.py", f"--checkpoint={TINY}", f"--bank={bank}", f"--queries={empty}",
                f"--out={tmp_path / 'out'}")
  assert result.returncode != 0
  assert "no records (the file is empty)" in result.stderr
  assert not (tmp_path / "out").exists()


def test_bank_of_another_model_is_refused(loaded, bank):
  other_weights = dataclasses.replace(loaded, params=jax.tree.map(lambda x: x * 1.01,
                                                                  loaded.params))
  with pytest.raises(BankError, match="other model weights"):
    open_server(other_weights, bank)
  other_config = dataclasses.replace(loaded, msa_config=loaded.msa_config.replace(chunk_size=16))
  with pytest.raises(BankError, match="another model configuration"):
    open_server(other_config, bank)


def test_question_longer_than_the_model_takes(bank):
  result = _run("generate.py", f"--checkpoint={TINY}", f"--bank={bank}", "--memory_devices=1",
                "--question=" + "What is the food of Vamoel Fambow? " * 2000)
  assert result.returncode != 0
  assert "question 0" in result.stderr and "more than max_context_tokens" in result.stderr


def test_serving_flags_are_defined_by_the_binary_not_on_import():
  from absl import flags  # pylint: disable=import-outside-toplevel
  from msa_jax.inference import flags as serving_flags  # pylint: disable=import-outside-toplevel
  assert "max_rounds" not in flags.FLAGS  # importing the module defined nothing
  values = flags.FlagValues()
  holders = serving_flags.define_serving_flags(values)
  values(["prog", "--router_only", "--router_docs=3", "--tier=device", "--temperature=0.5",
          "--top_k_docs=1"])
  assert holders.load_overrides() == {"top_k_docs": 1}
  config = holders.interleave_config()
  assert config.router_only and config.router_docs == 3
  kwargs = holders.server_kwargs()
  assert kwargs["tier"] == "device" and kwargs["sampling"].temperature == 0.5


def test_demo_retrieval_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  from benchmarks.demo_flags import define_retrieval_flags  # pylint: disable=import-outside-toplevel
  values = flags.FlagValues()
  holders = define_retrieval_flags(values)
  values(["prog"])
  assert holders.interleave() == demo.demo_interleave() and holders.selected_documents() == 1
  values = flags.FlagValues()
  holders = define_retrieval_flags(values)
  values(["prog", "--routed_ids", "--top_k_docs=0", "--max_rounds=3"])
  assert holders.interleave() == demo.demo_interleave(3, routed_ids=True)
  assert holders.selected_documents() is None  # the model's own


def test_demo_retrieval_defaults_to_the_official_loop_unless_asked_otherwise():
  """The official free-id loop by default; --router_only, --routed_ids or an explicit
  --routed_choices is taken as given, and contradictory explicit options are the config's clear
  error."""
  assert demo.demo_interleave(8) == InterleaveConfig(max_rounds=8)
  assert demo.demo_interleave(3, router_only=True) == InterleaveConfig(max_rounds=3,
                                                                       router_only=True)
  assert demo.demo_interleave(8, routed_ids=True) == InterleaveConfig(max_rounds=8,
                                                                      routed_ids=True,
                                                                      routed_choices=1)
  assert demo.demo_interleave(8, routed_choices=0) == InterleaveConfig(max_rounds=8,
                                                                       routed_ids=True)
  assert demo.DemoSettings().interleave == demo.demo_interleave()
  assert demo.DemoSettings().top_k_docs == 1
  with pytest.raises(ValueError, match="routed_ids and router_only"):
    demo.demo_interleave(8, router_only=True, routed_ids=True)
  with pytest.raises(ValueError, match="routed_choices"):
    demo.demo_interleave(8, routed_ids=False, routed_choices=2)
