"""Evaluation metrics against hand-computed values, and the LLM judge against a local fake
OpenAI-compatible server."""

import http.server
import json
import threading

import pytest

from msa_jax.data.records import RecordError
from msa_jax.data.tokenizer import Tokenizer, build_byte_tokenizer
from msa_jax.inference import judge as judgelib
from msa_jax.inference import metrics, qa_eval, queries
from msa_jax.inference.interleave import InMemoryDocuments, InterleaveDriver
from tests.interleave_fixtures import ScriptedModel


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


class _FakeServer:
  """A local chat-completions endpoint: replies with `replies` in turn (an int is an HTTP error
  status) and records each request's path, headers and JSON body."""

  def __init__(self, replies):
    self.replies, self.seen = list(replies), []
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        outer.seen.append((self.path, dict(self.headers), body))
        reply = outer.replies.pop(0)
        if isinstance(reply, int):
          self.send_response(reply)
          self.end_headers()
          return
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data.encode())

      def log_message(self, *args):
        pass

    self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
    threading.Thread(target=self.server.serve_forever, daemon=True).start()

  def close(self):
    self.server.shutdown()
    self.server.server_close()


def test_judge_over_http(monkeypatch):
  monkeypatch.setenv("TEST_JUDGE_KEY", "sk-secret-123")
  server = _FakeServer([503, " 4\n", "nothing"])
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
  server = _FakeServer([401])
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

  judge = judgelib.Judge("http://judge.invalid/v1", "m", api_key_env="TEST_JUDGE_KEY",
                         opener=not_json)
  with pytest.raises(judgelib.JudgeError, match="did not return a chat completion"):
    judge("q", "a", "b")
  with pytest.raises(ValueError, match="url and a model"):
    judgelib.Judge("", "m")


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
  out = qa_eval.evaluate(driver, qs, batch_size=1, judge=judge, log=logs.append)
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
    qa_eval.evaluate(driver, [])
