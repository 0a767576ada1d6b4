"""An LLM judge over an OpenAI-compatible chat-completions endpoint, with the paper's 0-5 rubric
(MSA_PAPER.md App. A): the judge reads the query, the true answer and the predicted answer and
replies with one integer. As in the official evaluation, the score is the first digit 0-5 in the
reply, at temperature 0. Only the standard library's urllib is used; the API key is read from an
environment variable and never written to logs, errors or results. It goes only to the endpoint
given: over https (plain http only to a loopback address, a judge on this machine), and redirects
are refused rather than followed, since urllib would resend the key to wherever they point.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable

RUBRIC = """You are grading an answer to a question against the true answer.
Consider the accuracy, completeness and relevance of the predicted answer in the context of the
query, and give one integer score from 0 to 5:
5: it matches the true answer exactly (differences of wording are fine).
4: it has all the core information, no errors, and a little non-critical redundancy.
3: it has the core information but is slightly incomplete or imprecise, without errors.
2: it is partially relevant: it omits much, or drifts from the topic of the query.
1: it attempts the query but is factually incorrect, or shows an incomplete or inaccurate
   understanding of it.
0: it is unrelated, gibberish, or pure hallucination.
Reply with the single number only.

Query: {query}
True Answer: {reference}
Predicted Answer: {prediction}
Score:"""

_SCORE = re.compile(r"[0-5]")
_RETRY_STATUS = (429, 500, 502, 503, 504)


class JudgeError(RuntimeError):
  """The judge endpoint failed or replied with something that is not a chat completion."""


def parse_score(reply: str) -> int | None:
  """The first digit 0-5 in the judge's reply (the official rule), or None when there is none."""
  match = _SCORE.search(reply)
  return int(match.group()) if match else None


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
  """A 3xx reply becomes an HTTPError instead of a second request carrying the key."""

  def redirect_request(self, req, fp, code, msg, headers, newurl):
    return None


_OPENER = urllib.request.build_opener(_RefuseRedirects)


def _is_loopback(host: str | None) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host or "").is_loopback
  except ValueError:
    return False


def check_endpoint(url: str) -> None:
  """Raises ValueError unless `url` is https, or http to a loopback address."""
  parts = urllib.parse.urlsplit(url)
  if parts.scheme == "https" and parts.hostname:
    return
  if parts.scheme == "http" and _is_loopback(parts.hostname):
    return
  raise ValueError(f"judge url {url!r}: the API key must not travel in clear, so the judge needs "
                   f"an https url (plain http only to a loopback address, e.g. "
                   f"http://127.0.0.1:8000/v1)")


def chat_completions_url(url: str) -> str:
  """`url` as given when it names the chat-completions route, else that route under it."""
  url = url.rstrip("/")
  return url if url.endswith("/chat/completions") else url + "/chat/completions"


@dataclasses.dataclass(frozen=True)
class Verdict:
  score: int | None
  reply: str


class Judge:
  """Scores predictions with a model behind `url` (e.g. https://openrouter.ai/api/v1).

  `api_key_env` names the environment variable holding the key (none sent when it is unset);
  `opener(request, timeout)` is urllib's, refusing redirects, unless a test replaces it. Transient
  HTTP errors (429, 5xx) and network errors are retried `retries` times with doubling waits.
  """

  def __init__(self, url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
               timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 1.0,
               opener: Callable = _OPENER.open):
    if not url or not model:
      raise ValueError("the judge needs an endpoint url and a model name")
    check_endpoint(url)
    self.url = chat_completions_url(url)
    self.model, self.api_key_env = model, api_key_env
    self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
    self.opener = opener

  def _request(self, prompt: str) -> urllib.request.Request:
    body = json.dumps({"model": self.model, "temperature": 0.0,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(self.api_key_env)
    if key:
      headers["Authorization"] = f"Bearer {key}"
    return urllib.request.Request(self.url, data=body, headers=headers, method="POST")

  def _reply(self, prompt: str) -> str:
    for attempt in range(self.retries + 1):
      try:
        with self.opener(self._request(prompt), timeout=self.timeout_s) as response:
          payload = response.read()
        break
      except urllib.error.HTTPError as e:
        if 300 <= e.code < 400:
          raise JudgeError(f"judge endpoint {self.url} answered HTTP {e.code}, a redirect to "
                           f"{e.headers.get('Location')!r}; redirects are not followed (the API "
                           f"key would go with them): give the final url") from None
        if e.code not in _RETRY_STATUS or attempt == self.retries:
          raise JudgeError(f"judge endpoint {self.url} answered HTTP {e.code} "
                           f"({e.reason})") from None
      except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        if attempt == self.retries:
          reason = getattr(e, "reason", e)
          raise JudgeError(f"judge endpoint {self.url} unreachable: {reason}") from None
      time.sleep(self.backoff_s * 2 ** attempt)
    try:
      return json.loads(payload)["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError):
      raise JudgeError(f"judge endpoint {self.url} did not return a chat completion: "
                       f"{payload[:200]!r}") from None

  def __call__(self, query: str, reference: str, prediction: str) -> Verdict:
    reply = self._reply(RUBRIC.format(query=query, reference=reference, prediction=prediction))
    return Verdict(parse_score(reply), reply)
