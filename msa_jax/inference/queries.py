"""Query files for evaluation against a memory, as (question, answer, gold display ids, task).

Formats (`read_queries` picks one by the file name):
- our JSONL records (`msa_jax.data.datasets`, `.jsonl`): the gold documents are each record's
  positive documents, named by their display ids (`doc_ids`, default their indices);
- the official benchmark query files (`.json`, or `.pkl`/`.pickle` with `allow_pickle`):
  `{question, labels, answer}` or `{query, reference_list, answer}` records over the official
  memory file they were written for (`memory_file`), whose indices are the display ids.

`check_against_memory` makes sure the memory the questions are asked of holds every gold document
with the same text, so a query file and a bank that do not belong together fail up front.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from msa_jax.data.datasets import read_jsonl, read_official
from msa_jax.data.records import RecordError


@dataclasses.dataclass(frozen=True)
class Query:
  question: str
  answer: str
  gold_ids: tuple[int, ...]
  task: str = ""
  gold_texts: tuple[str, ...] = ()  # the gold documents' texts, when the query file has them


def read_queries(path: str, *, memory_file: str | None = None,
                 allow_pickle: bool = False) -> list[Query]:
  """The queries of `path` (see the module docstring). Raises `RecordError` for a malformed or
  empty file."""
  if path.lower().endswith(".jsonl"):
    return [Query(r.question, r.answer, tuple(r.doc_ids[i] for i in r.gold_ids), r.task,
                  tuple(r.documents[i] for i in r.gold_ids)) for r in read_jsonl(path)]
  if memory_file is None:
    raise RecordError(f"{path} is an official query file (not .jsonl); its gold documents are "
                      f"named by the memory file it was written for: pass that memory file too")
  bench = read_official(memory_file, path, allow_pickle=allow_pickle)
  return [Query(q.question, q.answer, q.gold_ids, "official",
                tuple(bench.documents[i] for i in q.gold_ids)) for q in bench.queries]


def check_against_memory(queries: Sequence[Query], memory) -> None:
  """Raises `RecordError` unless `memory` (a `DocumentStore`, e.g. a bank) holds every gold
  document of `queries`, with the query file's text where it has one."""
  if not queries:
    raise RecordError("no queries")
  for n, q in enumerate(queries):
    texts = q.gold_texts or (None,) * len(q.gold_ids)
    for display_id, text in zip(q.gold_ids, texts):
      index = memory.index_of(display_id)
      if index is None:
        raise RecordError(f"query {n} ({q.question[:60]!r}): its gold document [{display_id}] is "
                          f"not in the memory; was the memory encoded from another corpus?")
      if text is not None and memory.document_text(index) != text:
        raise RecordError(f"query {n} ({q.question[:60]!r}): the memory's document "
                          f"[{display_id}] is not the query file's gold text; was the memory "
                          f"encoded from another corpus?")
