"""File datasets: our JSONL records and the official MSA benchmark files, as random-access sources.

JSONL (ours): one object per line, `{"documents": [str], "question": str, "answer": str,
"positive_ids": [[int], ...] or [int], "task": str (optional), "doc_ids": [int] (optional)}`;
`positive_ids` are 0-based indices into `documents`, the gold documents of each retrieval step, and
`doc_ids` the ids the model reads and writes for the documents (default: their indices).

Official benchmark (MSA_REFERENCE_IMPL.md §6): a memory file, a JSON list of document strings (or a
pickle of one), whose indices are the global document ids; and a query file, a JSON list of
`{"question", "labels": [gold ids], "answer"}` or `{"query", "reference_list": [gold texts],
"answer"}` (the pickled form). Gold texts map to ids by exact string match, duplicates collapsing
to the first index as in the official code. Pickles are refused unless the caller trusts them.

`OfficialRecords` turns each benchmark query into a training/eval `Record` whose memory is the
query's gold documents plus deterministically sampled distractors, up to a token budget.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import uuid
from typing import Callable, Iterable, Sequence

import numpy as np

from msa_jax.data import prompt_format as pf
from msa_jax.data.records import Record, RecordError, make_record
from msa_jax.text_files import read_utf8, utf8_lines

_REQUIRED_KEYS = ("documents", "question", "answer", "positive_ids")
_PICKLE_SUFFIXES = (".pkl", ".pickle")


# --------------------------------------------------------------------------------------------------
# JSONL records


def read_jsonl(path: str) -> list[Record]:
  """Every record of a JSONL file; blank lines are skipped. Errors name `path:line`."""
  records = []
  for lineno, line in utf8_lines(path, RecordError):
    if not line.strip():
      continue
    where = f"{path}:{lineno}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise RecordError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
      raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in obj]
    if missing:
      raise RecordError(f"{where}: missing key(s) {', '.join(missing)}")
    documents = obj["documents"]
    if not isinstance(documents, list):
      raise RecordError(f"{where}: documents must be a list of strings")
    task = obj.get("task", "")
    if task is None:
      task = ""
    if not isinstance(task, str):
      raise RecordError(f"{where}: task must be a string")
    positive_ids = obj["positive_ids"]
    if not isinstance(positive_ids, list):
      raise RecordError(f"{where}: positive_ids must be a list of ids or of lists of ids")
    doc_ids = obj.get("doc_ids")
    if doc_ids is not None and not isinstance(doc_ids, list):
      raise RecordError(f"{where}: doc_ids must be a list of integers")
    records.append(make_record(documents, obj["question"], obj["answer"], positive_ids,
                               task=task, where=where, doc_ids=doc_ids))
  if not records:
    raise RecordError(f"{path}: no records (the file is empty)")
  return records


def write_jsonl(records: Iterable[Record], path: str) -> None:
  """Writes one record per line to a temporary sibling, then renames it over `path`, so a reader
  never sees a partly written file."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      for record in records:
        f.write(json.dumps(record.to_json(), ensure_ascii=False))
        f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


class JsonlRecords:
  """A random-access source (`len`, `[i]`) over the records of a JSONL file, read once."""

  def __init__(self, path: str):
    self.path = path
    self._records = read_jsonl(path)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> Record:
    return self._records[index]

  def __repr__(self) -> str:
    return f"JsonlRecords({self.path!r}, {len(self)} records)"


# --------------------------------------------------------------------------------------------------
# The official benchmark format


@dataclasses.dataclass(frozen=True)
class OfficialQuery:
  """gold_ids: global ids (indices into the benchmark's documents), without repeats."""

  question: str
  answer: str
  gold_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class OfficialBenchmark:
  documents: list[str]
  queries: list[OfficialQuery]


def _is_pickle(path: str) -> bool:
  return path.lower().endswith(_PICKLE_SUFFIXES)


def _load(path: str, allow_pickle: bool, what: str):
  """The object in a JSON file, or in a pickle if the caller trusts it."""
  if _is_pickle(path):
    if not allow_pickle:
      raise RecordError(f"{what} file {path} is a pickle; loading a pickle runs arbitrary code "
                        f"from the file, so it is refused. Pass --allow_pickle (allow_pickle=True) "
                        f"if you trust this file")
    with open(path, "rb") as f:
      try:
        return pickle.load(f)
      except Exception as e:  # a corrupt pickle can raise almost anything
        raise RecordError(f"{what} file {path}: cannot unpickle ({type(e).__name__}: {e})") from e
  try:
    return json.loads(read_utf8(path, RecordError))
  except json.JSONDecodeError as e:
    raise RecordError(f"{what} file {path}: not valid JSON ({e.msg} at line {e.lineno} column "
                      f"{e.colno})") from None


def _as_list(obj, path: str, what: str) -> list:
  if isinstance(obj, (str, bytes, dict)) or not hasattr(obj, "__len__"):
    raise RecordError(f"{what} file {path}: expected a list, got {type(obj).__name__}")
  return list(obj)


def read_official_memory(path: str, allow_pickle: bool = False) -> list[str]:
  """The documents of an official memory file (a JSON list of strings, or a trusted pickle); a
  document's global id is its index."""
  documents = _as_list(_load(path, allow_pickle, "memory"), path, "memory")
  if not documents:
    raise RecordError(f"memory file {path}: no documents (empty list)")
  for i, doc in enumerate(documents):
    if not isinstance(doc, str):
      raise RecordError(f"memory file {path}: document {i} is a {type(doc).__name__}, not a "
                        f"string")
  return documents


def _gold_from_labels(labels, n_docs: int, where: str) -> list[int]:
  if isinstance(labels, (int, np.integer)) and not isinstance(labels, bool):
    labels = [labels]
  if isinstance(labels, (str, bytes, dict)) or not hasattr(labels, "__iter__"):
    raise RecordError(f"{where}: labels must be a list of document ids")
  ids = []
  for i in labels:
    if (not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not 0 <= i < n_docs):
      raise RecordError(f"{where}: label {i!r} is not a document id in [0, {n_docs})")
    ids.append(int(i))
  return ids


def _gold_from_texts(texts, doc_to_index: dict[str, int], where: str) -> list[int]:
  if isinstance(texts, (str, bytes, dict)) or not hasattr(texts, "__iter__"):
    raise RecordError(f"{where}: reference_list must be a list of document texts")
  ids = []
  for k, text in enumerate(texts):
    if not isinstance(text, str):
      raise RecordError(f"{where}: reference_list[{k}] is a {type(text).__name__}, not a string")
    if text not in doc_to_index:
      raise RecordError(f"{where}: reference_list[{k}] ({text[:60]!r}...) is not a document of "
                        f"the memory file (gold texts must match a memory document exactly)")
    ids.append(doc_to_index[text])
  return ids


def read_official(memory_path: str, queries_path: str, *,
                  allow_pickle: bool = False) -> OfficialBenchmark:
  """Reads an official benchmark's memory and query files (`.json`, or `.pkl`/`.pickle` when
  `allow_pickle`). Errors name the file and, for a query, its index."""
  documents = read_official_memory(memory_path, allow_pickle)
  raw = _as_list(_load(queries_path, allow_pickle, "query"), queries_path, "query")
  if not raw:
    raise RecordError(f"query file {queries_path}: no queries (empty list)")
  doc_to_index: dict[str, int] = {}
  for i, doc in enumerate(documents):
    doc_to_index.setdefault(doc, i)  # duplicate texts collapse to the first index
  queries = []
  for q, item in enumerate(raw):
    where = f"query file {queries_path}: query {q}"
    if not isinstance(item, dict):
      raise RecordError(f"{where}: expected an object, got {type(item).__name__}")
    question = item.get("query", item.get("question"))
    if not isinstance(question, str) or not question.strip():
      raise RecordError(f"{where}: needs a non-empty string 'query' or 'question'")
    if "answer" not in item:
      raise RecordError(f"{where}: missing key answer")
    answer = item["answer"]
    if not isinstance(answer, str):
      raise RecordError(f"{where}: answer must be a string, got {type(answer).__name__}")
    if "reference_list" in item:
      gold = _gold_from_texts(item["reference_list"], doc_to_index, where)
    elif "labels" in item:
      gold = _gold_from_labels(item["labels"], len(documents), where)
    else:
      raise RecordError(f"{where}: needs 'reference_list' (gold texts) or 'labels' (gold ids)")
    gold = list(dict.fromkeys(gold))
    if not gold:
      raise RecordError(f"{where}: no gold documents")
    for g in gold:
      if not documents[g]:
        raise RecordError(f"{where}: gold document {g} is empty")
    queries.append(OfficialQuery(question, answer, tuple(gold)))
  return OfficialBenchmark(documents=documents, queries=queries)


class OfficialRecords:
  """A random-access source of `Record`s, one per benchmark query.

  Record i holds query i's gold documents plus distractors drawn without replacement from the rest
  of the corpus (non-empty, non-gold documents) by a numpy Generator seeded with (seed, i), added
  in drawn order until the next one would take the memory past `memory_tokens` (or the record
  reaches `max_docs` documents, or the corpus runs out). The gold documents are then put at random
  positions; the record has one retrieval step holding every gold id (local, ascending) and task
  "official". The same (bench, seed, i) always gives the same record.

  `length_fn(wrapped_text) -> int` counts the tokens of one memory document exactly as the batch
  stores it, e.g. `lambda s: len(tokenizer.encode(s))`. Documents keep their global (memory file)
  ids as display ids (`Record.doc_ids`), as in a bank: the model reads and writes `[global id]`.
  Gold documents that alone exceed `memory_tokens` raise `RecordError` naming the query.
  """

  def __init__(self, bench: OfficialBenchmark, *, memory_tokens: int,
               length_fn: Callable[[str], int], seed: int, max_docs: int | None = None):
    if memory_tokens <= 0:
      raise ValueError(f"memory_tokens must be positive, got {memory_tokens}")
    if max_docs is not None and max_docs <= 0:
      raise ValueError(f"max_docs must be positive, got {max_docs}")
    self.bench = bench
    self.memory_tokens = memory_tokens
    self.length_fn = length_fn
    self.seed = seed
    self.max_docs = max_docs

  def __len__(self) -> int:
    return len(self.bench.queries)

  def _cost(self, doc_id: int) -> int:
    return int(self.length_fn(pf.wrap_document(doc_id, self.bench.documents[doc_id])))

  def _distractors(self, rng: np.random.Generator, exclude: set[int]):
    """Non-gold, non-empty global ids in a random order, without repeats."""
    docs = self.bench.documents
    n = len(docs)
    if n <= 200_000:
      for j in rng.permutation(n):
        j = int(j)
        if j not in exclude and docs[j]:
          yield j
      return
    seen = set(exclude)  # a large corpus: draw with rejection instead of permuting all of it
    while len(seen) < n:
      for j in rng.integers(0, n, size=256):
        j = int(j)
        if j in seen:
          continue
        seen.add(j)
        if docs[j]:
          yield j

  def _layout(self, rng: np.random.Generator, gold: Sequence[int],
              distractors: Sequence[int]) -> list[int]:
    n = len(gold) + len(distractors)
    slots = rng.choice(n, size=len(gold), replace=False)
    order: list[int | None] = [None] * n
    for g, slot in zip(gold, slots):
      order[int(slot)] = g
    rest = iter(distractors)
    return [next(rest) if o is None else o for o in order]

  def _check_index(self, index) -> int:
    n_queries = len(self)
    if isinstance(index, np.integer):
      index = int(index)
    if not isinstance(index, int) or isinstance(index, bool) or not -n_queries <= index < n_queries:
      raise IndexError(f"record {index!r} out of range for {n_queries} queries")
    return index % n_queries

  def _select(self, index: int) -> list[int]:
    """The global ids of record `index`'s documents, in local-id order."""
    query = self.bench.queries[index]
    gold = list(query.gold_ids)
    where = f"official query {index}"
    if self.max_docs is not None and len(gold) > self.max_docs:
      raise RecordError(f"{where}: {len(gold)} gold documents, more than max_docs={self.max_docs}")
    rng = np.random.default_rng([self.seed, index])
    used = sum(self._cost(g) for g in gold)
    if used > self.memory_tokens:
      raise RecordError(f"{where}: its {len(gold)} gold document(s) need {used} tokens, more "
                        f"than memory_tokens={self.memory_tokens}")
    distractors: list[int] = []
    limit = self.max_docs if self.max_docs is not None else len(self.bench.documents)
    for j in self._distractors(rng, set(gold)):
      if len(gold) + len(distractors) >= limit:
        break
      cost = self._cost(j)
      if used + cost > self.memory_tokens:
        break
      distractors.append(j)
      used += cost
    return self._layout(rng, gold, distractors)

  def __getitem__(self, index: int) -> Record:
    index = self._check_index(index)
    order = self._select(index)
    query = self.bench.queries[index]
    local = {j: k for k, j in enumerate(order)}
    hop = sorted(local[g] for g in query.gold_ids)
    return make_record([self.bench.documents[j] for j in order], query.question, query.answer,
                       [hop], task="official", where=f"official query {index}", doc_ids=order)

  def global_ids(self, index: int) -> list[int]:
    """The global (memory file) id of each document of record `index`, in local-id order."""
    index = self._check_index(index)
    return self._select(index)

  def __repr__(self) -> str:
    return (f"OfficialRecords({len(self)} queries, {len(self.bench.documents)} documents, "
            f"memory_tokens={self.memory_tokens}, seed={self.seed})")
