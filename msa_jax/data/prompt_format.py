"""MSA's text protocol: how documents are wrapped and how a generative-retrieval transcript reads.

These strings follow the official code (MSA_REFERENCE_IMPL.md §3.1, §5): documents are wrapped as
`<|im_start|>[i]. text[i]<|im_end|>` so the model can later write `[i]`; the prompt is the Qwen
instruct template split into a 3-token head `<|im_start|>user\\n` (memory-blind, cached at encode
time) and the tail `<|im_end|>\\n<|im_start|>`; a retrieval round is `[i][j]<|object_ref_end|>`,
after which the driver injects `[i]. text\\n…<|object_ref_end|>`; `<End-of-Retrieve>` ends
retrieval, the driver restates the question, and the answer follows `The answer to the question is:`.
Training samples (transcript.py), the synthetic generators and the interleave driver all use this
module so the three can never disagree.
"""

from __future__ import annotations

import re
from typing import Sequence

END_OF_RETRIEVE = "<End-of-Retrieve>"
TEMPLATE_HEAD = "<|im_start|>user\n"
TEMPLATE_TAIL = "<|im_end|>\n<|im_start|>"
ANSWER_PREFIX = "The answer to the question is: "
_QUESTION = ("\nPlease answer the question based on the above historical document information\n\n"
             "{question}\nPlease return all documents related to the question\n")
_RESTATEMENT = "<|im_start|>The user's question is: {question}\n<|object_ref_end|>"
_ID = re.compile(r"\[(\d+)\]")
_WRAPPED = re.compile(r"<\|im_start\|>\[(\d+)\]\. (.*)\[\1\]<\|im_end\|>", re.S)
_ANSWER_END = ("<|im_end|>", "<|endoftext|>")


def document_body(doc_id: int, text: str) -> str:
  """A wrapped document up to its closing id."""
  return f"<|im_start|>[{doc_id}]. {text}"


def document_close(doc_id: int) -> str:
  """A wrapped document's closing id (aligned to a chunk of its own in the aligned layout)."""
  return f"[{doc_id}]<|im_end|>"


def wrap_document(doc_id: int, text: str) -> str:
  """A memory document as the model sees it: its id at both ends."""
  return document_body(doc_id, text) + document_close(doc_id)


def unwrap_document(wrapped: str) -> tuple[int, str]:
  """(id, text) of `wrap_document(id, text)`; budgets get wrapped strings and re-lay them out."""
  m = _WRAPPED.fullmatch(wrapped)
  if m is None:
    raise ValueError(f"not a wrapped document: {wrapped[:80]!r}")
  return int(m.group(1)), m.group(2)


def question_text(question: str) -> str:
  """The routing part of the first-round prompt (the official instruction around the question)."""
  return _QUESTION.format(question=question)


def round_ids(doc_ids: Sequence[int]) -> str:
  """What the model writes to retrieve documents in one round."""
  return "".join(f"[{i}]" for i in doc_ids) + "<|object_ref_end|>"


def injected_documents(entries: Sequence[tuple[int, str]]) -> str:
  """(id, text) documents as the driver appends them after a round (without the closing
  delimiter, `injection_end`: this span is what routes in the next round)."""
  return "".join(f"[{i}]. {text}\n" for i, text in entries)


def injection_end() -> str:
  """Closes an injection."""
  return "<|object_ref_end|>"


def restatement(question: str) -> str:
  """What the driver appends after `<End-of-Retrieve>` (the official code does; Fig. 3 omits it)."""
  return _RESTATEMENT.format(question=question)


def final_answer_pieces(answer: str) -> tuple[str, str, str]:
  """The model's closing line cut around the answer's value: (prefix, value, end). The value keeps
  the space before it (` A`), where word-level and BPE tokenizers put it on the value's first
  token, so tokenizing the pieces apart gives the ids of the whole line."""
  prefix = ANSWER_PREFIX.rstrip()
  return prefix, ANSWER_PREFIX[len(prefix):] + answer, "<|im_end|>"


def final_answer(answer: str) -> str:
  """The model's closing line."""
  return "".join(final_answer_pieces(answer))


def parse_ids(text: str) -> list[int]:
  """Every document id `[n]` written in `text`, in order, without repeats."""
  return list(dict.fromkeys(int(m) for m in _ID.findall(text)))


def parse_answer(text: str) -> str:
  """The answer in generated text: what follows the last answer prefix (the whole text when there
  is none, as the official evaluation does), up to `<|im_end|>`/`<|endoftext|>`, stripped."""
  answer = text.rsplit(ANSWER_PREFIX.strip(), 1)[-1]
  for end in _ANSWER_END:
    answer = answer.split(end, 1)[0]
  return answer.strip()
