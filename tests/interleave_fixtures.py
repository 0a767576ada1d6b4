"""A scripted `generate_fn` for Memory Interleave tests."""

from msa_jax.data import prompt_format as pf
from msa_jax.inference.requests import Generation


class ScriptedModel:
  """A `generate_fn` that answers each question (found in the request's text) with the next text
  of its script, cut like an engine cuts: after the first stop id, or at max_new_tokens. Records
  every call's requests."""

  def __init__(self, tokenizer, scripts, routing=None):
    self.tok, self.routing = tokenizer, routing
    self.scripts = {k: list(v) for k, v in scripts.items()}
    self.calls = []

  def __call__(self, requests):
    self.calls.append(list(requests))
    out = []
    for r in requests:
      text = self.tok.decode(r.tokens)
      question = next(q for q in self.scripts if pf.question_text(q) in text)
      ids = self.tok.encode(self.scripts[question].pop(0))
      stop = next((n + 1 for n, t in enumerate(ids) if t in r.stop_ids), None)
      if stop is not None and stop <= r.max_new_tokens:
        ids, stopped = ids[:stop], True
      else:
        ids, stopped = ids[:r.max_new_tokens], False
      routing = self.routing(question, len(self.calls)) if self.routing else []
      out.append(Generation(tokens=ids, stopped=stopped, routing=routing))
    return out
