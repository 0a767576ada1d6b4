"""From a run's `DataConfig` and phase to the record source, tokenizer and grain iterator it trains on.

Synthetic records are generated on demand (record i is a pure function of (seed, i)), so a source
of a million records costs nothing until read. Each phase has its own memory size (the SFT
curriculum) and its own pipeline seed; every process reads its own shard of the records.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import numpy as np

from msa_jax.config import MSAConfig
from msa_jax.data import prompt_format as pf
from msa_jax.data.datasets import JsonlRecords, OfficialRecords, read_official
from msa_jax.data.pipeline import PipelineConfig, make_iterator
from msa_jax.data.records import Record
from msa_jax.data.synthetic import generate_mix, world_tokenizer
from msa_jax.data.tokenizer import Tokenizer
from msa_jax.data.transcript import document_length_fn
from msa_jax.training.train_config import DataConfig, PhaseConfig


def load_tokenizer(data: DataConfig) -> Tokenizer:
  """`world` is the synthetic world's code-built tokenizer; anything else a tokenizer.json path
  (or a checkpoint directory holding one)."""
  return world_tokenizer() if data.tokenizer == "world" else Tokenizer.from_file(data.tokenizer)


def _widest_id_length(length_fn: Callable[[str], int], width: int) -> Callable[[str], int]:
  """The length a wrapped document would have with a `width`-digit id (digits are one token each
  in the tokenizers we train with, so any such id costs the same)."""

  def widest(wrapped: str) -> int:
    doc_id, text = pf.unwrap_document(wrapped)
    if len(str(doc_id)) < width:
      wrapped = pf.wrap_document(10 ** width - 1, text)
    return length_fn(wrapped)

  return widest


def virtual_bank_ids(rng: np.random.Generator, n: int, max_bank: int) -> np.ndarray:
  """`n` distinct ids of a random subset of a bank of N documents (ids 0..N-1), N log-uniform in
  [n, max_bank]."""
  if n > max_bank:
    raise ValueError(f"a record of {n} documents does not fit doc_id_max={max_bank}")
  bank = int(np.exp(rng.uniform(np.log(max(n, 1)), np.log(max_bank))))
  return rng.choice(max(bank, n), size=n, replace=False)


@dataclasses.dataclass(frozen=True)
class SyntheticRecords:
  """Record i of a synthetic task mix, generated on access.

  Display ids follow the one scheme of banks and the demo: a document's id is its index in its
  memory. With `doc_id_max` > 0 a record's memory stands for a random subset of a bank of N
  documents, N drawn log-uniformly between the record's document count and `doc_id_max`, so the
  ids are distinct draws from 0..N-1 (drawn from (seed, i)): the model sees ids of every width a
  bank of up to `doc_id_max` documents has, in the proportions such banks have them. `align_to`
  is the documents' layout (`MSAConfig.doc_align_to`), the one `length_fn` counts.

  With `long_doc_fraction` > 0 that share of records (drawn from (seed, i)) has documents of
  up to `long_max_doc_tokens` instead of `max_doc_tokens`: a whole record is short or long, so
  short records keep their many distractors. `name_negatives`, `context_distractors` and
  `miss_rate` go to the tasks that take them (fact lookup, multi-hop); `niah_keys` is
  niah_multi_key's needle count; `card_distractors` goes to the needle tasks."""

  tasks: tuple[tuple[str, float], ...]
  seed: int
  num_records: int
  memory_tokens: int
  min_doc_tokens: int
  max_doc_tokens: int
  max_docs: int
  length_fn: Callable[[str], int]
  doc_id_max: int = 0
  align_to: int = 0
  long_doc_fraction: float = 0.0
  long_max_doc_tokens: int = 0
  name_negatives: int = 0
  context_distractors: int = 0
  miss_rate: float = 0.0
  niah_keys: int = 0
  card_distractors: float = 0.0

  def __len__(self) -> int:
    return self.num_records

  def doc_tokens_of(self, index: int) -> int:
    """The longest document record `index` may hold."""
    if (self.long_doc_fraction
        and np.random.default_rng([self.seed, index, 2]).random() < self.long_doc_fraction):
      return self.long_max_doc_tokens
    return self.max_doc_tokens

  def __getitem__(self, index: int) -> Record:
    if not 0 <= index < self.num_records:
      raise IndexError(f"record {index} out of range for {self.num_records} records")
    length_fn = self.length_fn
    if self.doc_id_max:  # budget every document for the widest id it may get
      length_fn = _widest_id_length(self.length_fn, len(str(self.doc_id_max - 1)))
    extra = {k: v for k, v in (("name_negatives", self.name_negatives),
                               ("context_distractors", self.context_distractors),
                               ("miss_rate", self.miss_rate),
                               ("num_keys", self.niah_keys),
                               ("card_distractors", self.card_distractors)) if v}
    record = generate_mix(dict(self.tasks), self.seed, index,
                          memory_tokens=self.memory_tokens, length_fn=length_fn,
                          min_doc_tokens=self.min_doc_tokens,
                          max_doc_tokens=self.doc_tokens_of(index),
                          max_docs=self.max_docs, align_to=self.align_to, **extra)
    if not self.doc_id_max:
      return record
    rng = np.random.default_rng([self.seed, index, 1])
    ids = virtual_bank_ids(rng, len(record.documents), self.doc_id_max)
    return record.with_ids(int(i) for i in ids)


def record_source(data: DataConfig, phase: PhaseConfig, tokenizer: Tokenizer, *, seed: int,
                  align_to: int = 0):
  """The random-access records of `phase`, sized to its memory in the documents' layout
  (`align_to`: `MSAConfig.doc_align_to`)."""
  memory_tokens = phase.memory_tokens
  length_fn = document_length_fn(tokenizer, align_to)
  if data.source == "synthetic":
    return SyntheticRecords(tuple(sorted(data.tasks.items())), seed, data.num_records,
                            memory_tokens, data.min_doc_tokens, data.max_doc_tokens,
                            data.max_docs, length_fn, data.doc_id_max, align_to,
                            data.long_doc_fraction, data.long_max_doc_tokens,
                            data.name_negatives, data.context_distractors, data.miss_rate,
                            data.niah_keys, data.card_distractors)
  if data.source == "jsonl":
    return JsonlRecords(data.path)
  bench = read_official(data.memory_path, data.queries_path, allow_pickle=data.allow_pickle)
  return OfficialRecords(bench, memory_tokens=memory_tokens, length_fn=length_fn, seed=seed,
                         max_docs=data.max_docs)


def pipeline_config(data: DataConfig, phase: PhaseConfig, msa: MSAConfig, *, seed: int
                    ) -> PipelineConfig:
  """This process's share of the global batch, over its shard of the records."""
  processes = jax.process_count()
  if data.batch_size % processes:
    raise ValueError(f"data.batch_size {data.batch_size} does not split over {processes} processes")
  return PipelineConfig(batch_size=data.batch_size // processes, mem_buckets=phase.buckets,
                        prompt_buckets=tuple(data.prompt_buckets), max_docs=data.max_docs,
                        chunk_size=msa.chunk_size, question_position=msa.question_position,
                        seed=seed, worker_count=data.worker_count,
                        answer_fraction=data.answer_fraction, doc_align_to=msa.doc_align_to,
                        shard_index=jax.process_index(), shard_count=processes)


def data_for_phase(data: DataConfig, phases, msa: MSAConfig, tokenizer: Tokenizer):
  """`index -> iterator` for the trainer: phase i reads records seeded by data.seed + i."""

  def make(index: int):
    phase = phases[index]
    seed = data.seed + index
    source = record_source(data, phase, tokenizer, seed=seed, align_to=msa.doc_align_to)
    return make_iterator(source, tokenizer, pipeline_config(data, phase, msa, seed=seed))

  return make


def check_tokenizer(tokenizer: Tokenizer) -> None:
  """The tokenizer must know MSA's special tokens, `<End-of-Retrieve>` included."""
  tokenizer.require_msa_tokens()
  tokenizer.token_id(pf.END_OF_RETRIEVE)


def tokenizer_file(data: DataConfig, workdir: str) -> str:
  """A tokenizer.json for the exported model (the world tokenizer is written into the workdir)."""
  if data.tokenizer != "world":
    path = data.tokenizer
    return os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
  from msa_jax.data.synthetic import save_world_tokenizer
  return save_world_tokenizer(os.path.join(workdir, "tokenizer.json"))
