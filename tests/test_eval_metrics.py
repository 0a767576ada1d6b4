"""Evaluation metrics against hand-computed values, and the LLM judge against a local fake
OpenAI-compatible server."""

import json

import pytest

from msa_jax import evaluation
from msa_jax.data.records import RecordError
from msa_jax.data.tokenizer import Tokenizer, build_byte_tokenizer
from msa_jax.inference import judge as judgelib
from msa_jax.inference import metrics, queries
from msa_jax.inference.interleave import InMemoryDocuments, InterleaveDriver
from msa_jax.jsonl_log import JsonlLog
from tests.interleave_fixtures import ScriptedModel
from tests.judge_fixtures import FakeJudgeServer


def test_normalisation_exact_match_and_token_f1():
  assert metrics.normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
  assert metrics.exact_match("the pizza.", "Pizza") == 1.0
  assert metrics.exact_match("pizza pie", "pizza") == 0.0
  # pred {may, 5, 1939, in, paris} vs ref {may, 5, 1939}: P = 3/5, R = 1, F1 = 2*0.6/1.6 = 0.75
  assert metrics.token_f1("May 5, 1939 in Paris", "May 5, 1939") == pytest.approx(0.75)
  # shared words count with multiplicity: [red, red, blue] vs [red] share 1: P = 1/3, R = 1
  assert metrics.token_f1("red red blue", "red") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
  assert metrics.token_f1("", "") == 1.0 and metrics.token_f1("", "x") == 0.0
  assert metrics.token_f1("green", "red") == 0.0


def test_retrieval_precision_recall_f1():
  # pred {1, 2, 3, 4}, gold {2, 4, 9}: hits 2, P = 1/2, R = 2/3, F1 = 2*(1/3)/(7/6) = 4/7
  p, r, f = metrics.retrieval_prf([1, 2, 3, 4, 2], [2, 4, 9])
  assert (p, r) == (0.5, pytest.approx(2 / 3)) and f == pytest.approx(4 / 7)
  assert metrics.retrieval_prf([], [3]) == (0.0, 0.0, 0.0)
  assert metrics.retrieval_prf([3], [3]) == (1.0, 1.0, 1.0)
  with pytest.raises(ValueError, match="gold"):
    metrics.retrieval_prf([1], [])


def test_summary_means_per_task():
  rows = [{"task": "a", **metrics.score_answer("pizza", "Pizza", [1], [1])},
          {"task": "a", **metrics.score_answer("soup", "pizza", [1, 2], [2]), "judge_score": 4},
          {"task": "b", **metrics.score_answer("", "x", [], [5]), "judge_score": None}]
  summary = metrics.summarize(rows, metrics.METRICS + ("judge_score",))
  assert summary["all"]["n"] == 3 and summary["a"]["n"] == 2 and summary["b"]["n"] == 1
  assert summary["all"]["exact_match"] == pytest.approx(1 / 3)
  assert summary["a"]["retrieval_precision"] == pytest.approx((1 + 0.5) / 2)
  assert summary["a"]["retrieval_exact"] == pytest.approx(0.5)
  assert summary["all"]["judge_score"] == 4.0  # None (unparsed) is left out of the mean
  assert "judge_score" not in summary["b"]
  table = metrics.format_table(summary)
  assert table.splitlines()[0].split()[:3] == ["n", "exact_match", "token_f1"]
  assert table.splitlines()[1].split()[:3] == ["all", "3", "0.3333"]
  with pytest.raises(ValueError, match="no rows"):
    metrics.summarize([])


def test_no_gold_ids_leave_retrieval_unscored():
  row = {"task": "a", **metrics.score_answer("pizza", "pizza", [3], [])}
  assert row["exact_match"] == 1.0
  assert all(row[k] is None for k in metrics.RETRIEVAL_METRICS)
  summary = metrics.summarize([row])
  assert summary["all"]["exact_match"] == 1.0
  assert not set(metrics.RETRIEVAL_METRICS) & set(summary["all"])


def test_parse_score():
  assert judgelib.parse_score("4") == 4
  assert judgelib.parse_score("Score: 5/5") == 5
  assert judgelib.parse_score("I would give 9 ... no, 3") == 3  # the first digit 0-5
  assert judgelib.parse_score("no idea") is None


def test_judge_over_http(monkeypatch):
  monkeypatch.setenv("TEST_JUDGE_KEY", "sk-secret-123")
  server = FakeJudgeServer([503, " 4\n", "nothing"])
  try:
    judge = judgelib.Judge(server.url, "judge-model", api_key_env="TEST_JUDGE_KEY",
                           backoff_s=0.0)
    verdict = judge("Who?", "Bill", "Bill Watts")
    assert verdict == judgelib.Verdict(4, " 4\n")
    assert len(server.seen) == 2  # the 503 was retried
    path, headers, body = server.seen[-1]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-secret-123"
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    prompt = body["messages"][0]["content"]
    assert "Query: Who?\nTrue Answer: Bill\nPredicted Answer: Bill Watts" in prompt
    assert "5: it matches the true answer exactly" in prompt
    assert judge("Who?", "Bill", "x").score is None
  finally:
    server.close()


def test_judge_errors_are_clear_and_never_show_the_key(monkeypatch):
  monkeypatch.setenv("TEST_JUDGE_KEY", "sk-secret-123")
  server = FakeJudgeServer([401])
  try:
    judge = judgelib.Judge(server.url + "/chat/completions", "m", api_key_env="TEST_JUDGE_KEY")
    with pytest.raises(judgelib.JudgeError, match="HTTP 401") as info:
      judge("q", "a", "b")
    assert "sk-secret" not in str(info.value) and info.value.__cause__ is None
    assert server.seen[0][0] == "/v1/chat/completions"
  finally:
    server.close()
  monkeypatch.delenv("TEST_JUDGE_KEY")

  def not_json(request, timeout):
    assert "Authorization" not in request.headers  # no key in the environment: none sent

    class Response:
      def __enter__(self):
        return self

      def __exit__(self, *args):
        return False

      def read(self):
        return b"<html>gateway</html>"

    return Response()

  judge = judgelib.Judge("https://judge.invalid/v1", "m", api_key_env="TEST_JUDGE_KEY",
                         opener=not_json)
  with pytest.raises(judgelib.JudgeError, match="did not return a chat completion"):
    judge("q", "a", "b")
  with pytest.raises(ValueError, match="url and a model"):
    judgelib.Judge("", "m")


def test_judge_refuses_redirects_so_its_key_stays_with_the_endpoint(monkeypatch):
  monkeypatch.setenv("TEST_JUDGE_KEY", "sk-secret-123")
  elsewhere = FakeJudgeServer(["5"])  # another port: another origin
  judge_server = FakeJudgeServer([("redirect", elsewhere.url + "/chat/completions")])
  try:
    judge = judgelib.Judge(judge_server.url, "m", api_key_env="TEST_JUDGE_KEY", backoff_s=0.0)
    with pytest.raises(judgelib.JudgeError, match=r"answered HTTP 302, a redirect to "
                                                  r"'http://127.0.0.1:\d+/v1/chat/completions'; "
                                                  r"redirects are not followed"):
      judge("q", "a", "b")
    assert judge_server.seen[0][1]["Authorization"] == "Bearer sk-secret-123"
    assert elsewhere.seen == []  # neither the key nor the request went there
  finally:
    judge_server.close()
    elsewhere.close()


@pytest.mark.parametrize("url, ok", [
    ("https://openrouter.ai/api/v1", True), ("http://127.0.0.1:8000/v1", True),
    ("http://localhost:8000/v1", True), ("http://[::1]:8000/v1", True),
    ("http://127.3.2.1/v1", True), ("http://openrouter.ai/api/v1", False),
    ("http://10.0.0.5:8000/v1", False), ("ftp://127.0.0.1/v1", False), ("openrouter.ai/v1", False),
    ("https:///v1", False)])
def test_judge_needs_https_except_on_loopback(url, ok):
  if ok:
    judgelib.Judge(url, "m")
  else:
    with pytest.raises(ValueError, match="needs an https url"):
      judgelib.Judge(url, "m")


# --------------------------------------------------------------------------- query files


DOCS = ["Bill Watts (born May 5, 1939) is a promoter.", "The Eiffel Tower is in Paris.",
        "Erik Watts is the son of Bill Watts."]


def _write(path, text):
  path.write_text(text)
  return str(path)


def test_read_queries_jsonl_and_official(tmp_path):
  record = {"documents": DOCS, "question": "Where is the tower?", "answer": "Paris",
            "positive_ids": [1], "task": "lookup", "doc_ids": [10, 11, 12]}
  jsonl = _write(tmp_path / "q.jsonl", json.dumps(record) + "\n")
  (q,) = queries.read_queries(jsonl)
  assert q == queries.Query("Where is the tower?", "Paris", (11,), "lookup", (DOCS[1],))
  memory = _write(tmp_path / "memory.json", json.dumps(DOCS))
  official = _write(tmp_path / "q.json", json.dumps([
      {"question": "Who is Erik's father?", "labels": [2, 0], "answer": "Bill"},
      {"query": "Where?", "reference_list": [DOCS[1]], "answer": "Paris"}]))
  a, b = queries.read_queries(official, memory_file=memory)
  assert a.gold_ids == (2, 0) and a.gold_texts == (DOCS[2], DOCS[0]) and a.task == "official"
  assert b.question == "Where?" and b.gold_ids == (1,)
  with pytest.raises(RecordError, match="pass that memory file"):
    queries.read_queries(official)


def test_empty_query_files_are_clear_errors(tmp_path):
  with pytest.raises(RecordError, match="no records"):
    queries.read_queries(_write(tmp_path / "empty.jsonl", "\n"))
  memory = _write(tmp_path / "memory.json", json.dumps(DOCS))
  with pytest.raises(RecordError, match="no queries"):
    queries.read_queries(_write(tmp_path / "empty.json", "[]"), memory_file=memory)


def test_queries_checked_against_the_memory():
  memory = InMemoryDocuments(DOCS, [10, 11, 12])
  good = queries.Query("q", "a", (12, 10), "", (DOCS[2], DOCS[0]))
  queries.check_against_memory([good, queries.Query("q", "a", (11,))], memory)
  with pytest.raises(RecordError, match=r"query 1 .*gold document \[13\] is not in the memory"):
    queries.check_against_memory([good, queries.Query("q2", "a", (13,))], memory)
  with pytest.raises(RecordError, match=r"document \[10\] is not the query file's gold text"):
    queries.check_against_memory([queries.Query("q", "a", (10,), "", (DOCS[1],))], memory)
  with pytest.raises(RecordError, match="no queries"):
    queries.check_against_memory([], memory)


def test_evaluate_scores_each_answer_and_asks_the_judge():
  tok = Tokenizer(build_byte_tokenizer(extra_special_tokens=("<End-of-Retrieve>",)))
  model = ScriptedModel(tok, {
      "Who is Erik's father?": ["[2][7]<|object_ref_end|>", "<End-of-Retrieve>",
                                "The answer to the question is: Bill Watts<|im_end|>"],
      "Where is the tower?": ["<End-of-Retrieve>",
                              "The answer to the question is: in Paris<|im_end|>"]})
  driver = InterleaveDriver(model, tok, InMemoryDocuments(DOCS))
  qs = [queries.Query("Who is Erik's father?", "Bill Watts", (2, 0), "multi"),
        queries.Query("Where is the tower?", "Paris", (1,), "single")]
  judged = []

  def judge(question, reference, prediction):
    judged.append((question, reference, prediction))
    return judgelib.Verdict(5 if prediction == reference else None, "reply")

  logs = []
  out = evaluation.evaluate_interleave(driver, qs, batch_size=1, judge=judge, log=logs.append)
  first, second = out["records"]
  # [2][7] vs gold {2, 0}: P = 1/2, R = 1/2; "in Paris" vs "Paris": F1 = 2/3
  assert first["prediction"] == "Bill Watts" and first["exact_match"] == 1.0
  assert first["retrieved_ids"] == [2, 7] and first["rounds"][0]["unknown_ids"] == [7]
  assert (first["retrieval_precision"], first["retrieval_recall"]) == (0.5, 0.5)
  assert second["exact_match"] == 0.0 and second["token_f1"] == pytest.approx(2 / 3)
  assert second["retrieval_recall"] == 0.0
  assert judged == [("Who is Erik's father?", "Bill Watts", "Bill Watts"),
                    ("Where is the tower?", "Paris", "in Paris")]
  assert (first["judge_score"], second["judge_score"]) == (5, None)
  summary = out["summary"]
  assert summary["all"]["exact_match"] == 0.5 and summary["all"]["judge_score"] == 5.0
  assert summary["all"]["judge_unparsed"] == 1 and summary["multi"]["n"] == 1
  assert len(logs) == 2 and logs[-1].startswith("2/2 questions")
  with pytest.raises(ValueError, match="no queries"):
    evaluation.evaluate_interleave(driver, [])


def _scripted_driver(calls):
  """A driver answering "[0]" then "A<n>" to question "Q<n>", counting the questions it is asked."""
  tok = Tokenizer(build_byte_tokenizer(extra_special_tokens=("<End-of-Retrieve>",)))
  scripts = {f"Q{n}": ["<End-of-Retrieve>", f"The answer to the question is: A{n}<|im_end|>"]
             for n in range(5)}
  driver = InterleaveDriver(ScriptedModel(tok, scripts), tok, InMemoryDocuments(DOCS))
  run = driver.run

  def counted(questions):
    calls.append(list(questions))
    if "Q3" in questions and len(calls) == 2:
      raise KeyboardInterrupt("killed")
    return run(questions)

  driver.run = counted
  return driver


def test_evaluation_survives_a_kill_and_a_failing_judge(tmp_path):
  qs = [queries.Query(f"Q{n}", f"A{n}", (0,)) for n in range(5)]
  generations = JsonlLog(str(tmp_path / "generations.jsonl"), {"run": 1})
  judgements = JsonlLog(str(tmp_path / "judgements.jsonl"), {"judge": "j"})
  calls = []
  asked = []

  def down(question, reference, prediction):
    asked.append(question)
    raise judgelib.JudgeError("judge endpoint https://j/chat/completions unreachable: refused")

  with pytest.raises(KeyboardInterrupt):  # killed in its second batch
    evaluation.evaluate_interleave(_scripted_driver(calls), qs, batch_size=2, judge=down,
                                   generations=generations, judgements=judgements)
  assert [r["index"] for r in generations.read()] == [0, 1]  # the first batch was kept
  logs, calls = [], []
  out = evaluation.evaluate_interleave(_scripted_driver(calls), qs, batch_size=2, judge=down,
                                       generations=generations, judgements=judgements,
                                       log=logs.append)
  assert calls == [["Q2", "Q3"], ["Q4"]] and logs[0].startswith("resuming: 2 of 5 questions")
  assert [r["prediction"] for r in out["records"]] == ["A0", "A1", "A2", "A3", "A4"]
  assert asked == ["Q0", "Q1", "Q2"]  # then the judge is taken as down
  errors = [r["judge_error"] for r in out["records"]]
  assert errors[0].endswith("unreachable: refused")
  assert errors[3] == "not asked: the judge failed 3 times in a row"
  assert out["summary"]["all"]["judge_failed"] == 5 and out["summary"]["all"]["exact_match"] == 1
  asked.clear()

  def up(question, reference, prediction):
    asked.append(question)
    return judgelib.Verdict(5, "5")

  calls = []
  out = evaluation.evaluate_interleave(_scripted_driver(calls), qs, batch_size=2, judge=up,
                                       generations=generations, judgements=judgements)
  assert calls == [] and asked == ["Q0", "Q1", "Q2", "Q3", "Q4"]  # only the judge ran again
  assert [r["judge_score"] for r in out["records"]] == [5] * 5
  assert out["summary"]["all"]["judge_failed"] == 0 and out["summary"]["all"]["judge_score"] == 5
  out = evaluation.evaluate_interleave(_scripted_driver(calls), qs, judge=up,
                                       generations=generations, judgements=judgements)
  assert calls == [] and len(asked) == 5  # nothing left to do
  with pytest.raises(ValueError, match="record 0 is not one of these queries"):
    evaluation.evaluate_interleave(_scripted_driver(calls), qs[1:], generations=generations)
