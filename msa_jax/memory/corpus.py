"""Corpus readers for bank encoding: a sized, re-iterable sequence of `Document`s, streamed.

Formats:
- "jsonl": one `{"text": str, "id": int (optional)}` per line (blank lines skipped);
- "text": a directory (its regular files, sorted by name) or a glob; one document per file, UTF-8;
- "official_json": the official MSA memory file, a JSON list of document strings (a pickle only
  with `allow_pickle`); a document's display id is its index in the file, as the benchmarks'
  gold labels expect.

Errors name the file (and line) and raise `BankError`; an empty corpus is an error.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Iterator

from msa_jax.data.datasets import read_official_memory
from msa_jax.data.records import RecordError
from msa_jax.memory.errors import BankError
from msa_jax.text_files import read_utf8, utf8_lines

FORMATS = ("jsonl", "text", "official_json")


@dataclasses.dataclass(frozen=True)
class Document:
  """A document's original text and, if the corpus names one, the id the model reads as "[id]"
  (None: the document's row in the bank)."""

  text: str
  display_id: int | None = None


class JsonlCorpus:
  """The documents of a JSONL file, parsed lazily on each pass (`len` counts non-blank lines)."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise BankError(f"corpus file {path} does not exist")
    self.path = path
    with open(path, "rb") as f:
      self._len = sum(1 for line in f if line.strip())
    if self._len == 0:
      raise BankError(f"corpus file {path} has no documents")

  def __len__(self) -> int:
    return self._len

  def __iter__(self) -> Iterator[Document]:
    for lineno, line in utf8_lines(self.path, BankError):
      if line.strip():
        yield _jsonl_document(line, f"{self.path}:{lineno}")


def _jsonl_document(line: str, where: str) -> Document:
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise BankError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
    raise BankError(f"{where}: expected an object with a string 'text' (and an optional integer "
                    f"'id')")
  doc_id = obj.get("id")
  if doc_id is not None and (not isinstance(doc_id, int) or isinstance(doc_id, bool)
                             or doc_id < 0):
    raise BankError(f"{where}: 'id' must be a non-negative integer, got {doc_id!r}")
  return Document(obj["text"], doc_id)


class TextFilesCorpus:
  """One document per file: the regular files of a directory (sorted by name) or of a glob."""

  def __init__(self, pattern: str):
    if os.path.isdir(pattern):
      files = [os.path.join(pattern, n) for n in os.listdir(pattern)]
    else:
      files = glob.glob(pattern)
    self.files = sorted(f for f in files if os.path.isfile(f))
    if not self.files:
      raise BankError(f"corpus {pattern}: no files (expected a directory of text files or a glob "
                      f"matching some)")

  def __len__(self) -> int:
    return len(self.files)

  def __iter__(self) -> Iterator[Document]:
    for path in self.files:
      yield Document(read_utf8(path, BankError))


def official_corpus(path: str, allow_pickle: bool = False) -> list[Document]:
  """The official memory list; display ids are the documents' indices in the file."""
  if not os.path.isfile(path):
    raise BankError(f"memory file {path} does not exist")
  try:
    texts = read_official_memory(path, allow_pickle)
  except RecordError as e:
    raise BankError(str(e)) from None
  return [Document(text, i) for i, text in enumerate(texts)]


def open_corpus(path: str, fmt: str, *, allow_pickle: bool = False):
  """The corpus at `path` in format `fmt` (one of `FORMATS`)."""
  if fmt == "jsonl":
    return JsonlCorpus(path)
  if fmt == "text":
    return TextFilesCorpus(path)
  if fmt == "official_json":
    return official_corpus(path, allow_pickle)
  raise BankError(f"unknown corpus format {fmt!r}; expected one of {FORMATS}")
