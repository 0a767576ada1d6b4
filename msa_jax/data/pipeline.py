"""The grain input pipeline: a random-access source of `Record`s -> `(MemoryBatch, PromptBatch)`.

  MapDataset.source(records)           random access; each element tagged with its source index
    [shard_index::shard_count]         this process's records
    .shuffle(seed)                     a new order every epoch (grain reseeds per epoch)
    .repeat(num_epochs)                None = forever
    .map_with_index(choose one step)   step ~ uniform over num_steps(record), drawn from a Generator
                                       seeded by (seed, record index, epoch); paper §3.5: chains
                                       are split into single-step samples, randomly selected
    .batch(batch_size, drop_remainder, build_batch_bucketed)   numpy batches, bucketed shapes
    .to_iter_dataset(ReadOptions)      thread prefetch
    [.mp_prefetch(workers)]            worker_count > 0: grain multiprocessing

Every element is a function of (seed, position), so an iterator restored with `set_state` continues
with exactly the batches the original would have produced, epochs included. Batches are numpy
(host) arrays; putting them on devices is the trainer's job.

Packing: a sample's documents go whole, in order, into its own memory row (`build_batch`), so a
document is never split; a document longer than the largest memory bucket, or a memory or prompt
that fits no bucket, raises `BatchError` naming the record's index in the source.

grain multiprocessing (worker_count > 0) spawns workers and needs absl flags parsed in the main
process (`absl.flags.FLAGS.mark_as_parsed()`, or run under `absl.app.run`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Sequence

import grain
import numpy as np

from msa_jax.data.batch import MemoryBatch, PromptBatch
from msa_jax.data.batch_builder import BatchError, Sample, build_batch_bucketed
from msa_jax.data.records import Record
from msa_jax.data.transcript import num_steps, record_step_sample


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """batch_size is per process. mem_buckets/prompt_buckets: the allowed memory/prompt row lengths
  (a batch takes the smallest fitting its longest row). max_docs, chunk_size, question_position: as
  in `build_batch` (the model's D_max, P and question_position). doc_align_to: the documents'
  layout (`MSAConfig.doc_align_to`, see `transcript.document_ids`). read_threads and
  prefetch_buffer_size: grain's in-process prefetch of whole batches (per worker with workers)."""

  batch_size: int
  mem_buckets: tuple[int, ...]
  prompt_buckets: tuple[int, ...]
  max_docs: int
  chunk_size: int
  question_position: int
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  worker_count: int = 0
  shard_index: int = 0
  shard_count: int = 1
  read_threads: int = 2
  prefetch_buffer_size: int = 4
  answer_fraction: float | None = None  # see `choose_step`; None: every step equally often
  doc_align_to: int = 0

  def validate(self) -> None:
    if self.answer_fraction is not None and not 0.0 <= self.answer_fraction <= 1.0:
      raise ValueError(f"PipelineConfig.answer_fraction must be in [0, 1], got "
                       f"{self.answer_fraction}")
    for name in ("batch_size", "max_docs", "chunk_size", "shard_count", "read_threads",
                 "prefetch_buffer_size"):
      if getattr(self, name) <= 0:
        raise ValueError(f"PipelineConfig.{name} must be positive, got {getattr(self, name)}")
    if self.doc_align_to < 0:
      raise ValueError(f"PipelineConfig.doc_align_to must be >= 0, got {self.doc_align_to}")
    if self.question_position < 0:
      raise ValueError(f"PipelineConfig.question_position must be >= 0, got "
                       f"{self.question_position}")
    if not 0 <= self.shard_index < self.shard_count:
      raise ValueError(f"PipelineConfig.shard_index {self.shard_index} outside [0, "
                       f"{self.shard_count})")
    if self.num_epochs is not None and self.num_epochs <= 0:
      raise ValueError(f"PipelineConfig.num_epochs must be positive or None, got "
                       f"{self.num_epochs}")
    if self.worker_count < 0:
      raise ValueError(f"PipelineConfig.worker_count must be >= 0, got {self.worker_count}")
    for name in ("mem_buckets", "prompt_buckets"):
      buckets = getattr(self, name)
      if not buckets or any(b <= 0 for b in buckets):
        raise ValueError(f"PipelineConfig.{name} must be a non-empty tuple of positive lengths, "
                         f"got {buckets!r}")


@dataclasses.dataclass(frozen=True)
class _Item:
  """A chosen sample with where it came from (for error messages)."""

  record_index: int
  epoch: int
  step: int
  sample: Sample


def choose_step(record: Record, record_index: int, epoch: int, seed: int,
                answer_fraction: float | None = None) -> int:
  """The step trained on for this record in this epoch, deterministic in (seed, record_index,
  epoch): uniform over `num_steps(record)`, or, with `answer_fraction`, the answer step (the last)
  with that probability and a uniform retrieval step otherwise. Copying the answer out of the
  injected text is the skill a small model learns last, so a run may show it more answer steps."""
  rng = np.random.default_rng([seed, record_index, epoch])
  n = num_steps(record)
  if answer_fraction is None:
    return int(rng.integers(n))
  if rng.random() < answer_fraction:
    return n - 1
  return int(rng.integers(n - 1))


class _ToSample:
  """(position in the repeated stream, (source index, record)) -> `_Item`. A class (not a closure)
  so the pipeline pickles cleanly into grain workers."""

  def __init__(self, tokenizer, seed: int, source_len: int, shard_len: int,
               answer_fraction: float | None, align_to: int = 0):
    self.tokenizer = tokenizer
    self.seed = seed
    self.answer_fraction = answer_fraction
    self.align_to = align_to
    self.source_len = source_len
    self.shard_len = shard_len

  def __call__(self, position: int, tagged: tuple[int, Record]) -> _Item:
    index, record = tagged
    index %= self.source_len  # grain's source index grows past len across epochs
    epoch = position // self.shard_len
    if not isinstance(record, Record):
      raise TypeError(f"source element {index} is a {type(record).__name__}, not a Record")
    step = choose_step(record, index, epoch, self.seed, self.answer_fraction)
    return _Item(index, epoch, step,
                 record_step_sample(record, step, self.tokenizer, align_to=self.align_to))


class _BuildBatch:
  """A list of `_Item`s -> (MemoryBatch, PromptBatch) of numpy arrays; errors name the record."""

  def __init__(self, cfg: PipelineConfig, pad_id: int, vocab_size: int):
    self.cfg = cfg
    self.pad_id = pad_id
    self.vocab_size = vocab_size

  def _check(self, item: _Item) -> None:
    """The errors a bucket choice would report vaguely, stated for the record."""
    where = f"record {item.record_index} of the source (step {item.step}, epoch {item.epoch})"
    sample = item.sample
    mem_max, prompt_max = max(self.cfg.mem_buckets), max(self.cfg.prompt_buckets)
    for j, doc in enumerate(sample.documents):
      if len(doc) > mem_max:
        raise BatchError(f"{where}: document {j} has {len(doc)} tokens, longer than the largest "
                         f"memory bucket ({mem_max}); documents are never split across rows")
    if sample.memory_len > mem_max:
      raise BatchError(f"{where}: its {len(sample.documents)} documents need {sample.memory_len} "
                       f"tokens, more than the largest memory bucket ({mem_max}); a sample's "
                       f"documents share one memory row")
    if sample.prompt_len > prompt_max:
      raise BatchError(f"{where}: its prompt needs {sample.prompt_len} tokens, more than the "
                       f"largest prompt bucket ({prompt_max})")

  def __call__(self, items: Sequence[_Item]) -> tuple[MemoryBatch, PromptBatch]:
    cfg = self.cfg
    for item in items:
      self._check(item)
    try:
      return build_batch_bucketed([it.sample for it in items], cfg.mem_buckets,
                                  cfg.prompt_buckets, max_docs=cfg.max_docs,
                                  chunk_size=cfg.chunk_size,
                                  question_position=cfg.question_position, pad_id=self.pad_id,
                                  vocab_size=self.vocab_size)
    except BatchError as e:
      m = re.match(r"sample (\d+): (.*)", str(e), re.S)
      if not m:
        raise
      it = items[int(m.group(1))]
      raise BatchError(f"record {it.record_index} of the source (step {it.step}, epoch "
                       f"{it.epoch}): {m.group(2)}") from None


def _tag(index: int, record: Record) -> tuple[int, Record]:
  return index, record


def make_dataset(source: Sequence[Record], tokenizer, cfg: PipelineConfig) -> grain.IterDataset:
  """An IterDataset of `(MemoryBatch, PromptBatch)` numpy batches from a random-access source of
  Records (`len(source)`, `source[i]`: a list, `JsonlRecords`, `OfficialRecords`, ...)."""
  cfg.validate()
  n = len(source)
  if n == 0:
    raise ValueError("the source has no records")
  ds = grain.MapDataset.source(source).map_with_index(_tag)
  ds = ds[cfg.shard_index::cfg.shard_count]
  shard_len = len(ds)
  if shard_len == 0:
    raise ValueError(f"shard {cfg.shard_index} of {cfg.shard_count} has no records (the source "
                     f"has {n})")
  if cfg.shuffle:
    ds = ds.shuffle(seed=cfg.seed)
  ds = ds.repeat(cfg.num_epochs)
  ds = ds.map_with_index(_ToSample(tokenizer, cfg.seed, n, shard_len, cfg.answer_fraction,
                                   cfg.doc_align_to))
  ds = ds.batch(cfg.batch_size, drop_remainder=True,
                batch_fn=_BuildBatch(cfg, tokenizer.pad_id, tokenizer.vocab_size))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                               prefetch_buffer_size=cfg.prefetch_buffer_size))
  if cfg.worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
  return it_ds


def make_iterator(source: Sequence[Record], tokenizer, cfg: PipelineConfig,
                  state: dict | str | None = None) -> grain.DatasetIterator:
  """`iter(make_dataset(...))`, restored to `state` (from `get_state()`, or its JSON) if given."""
  it = iter(make_dataset(source, tokenizer, cfg))
  if state is not None:
    it.set_state(iterator_state_from_json(state) if isinstance(state, str) else state)
  return it


# --------------------------------------------------------------------------------------------------
# Iterator state <-> JSON. grain's states are nested dicts/lists of ints and strings (in-process:
# {"next_index": k}); the multiprocessing state's `future_states` may be keyed by int, which plain
# JSON would turn into strings, so non-string-keyed dicts, tuples and bytes are tagged and restored
# exactly.

_TAG = "__grain_state__"


def _encode(obj: Any) -> Any:
  if isinstance(obj, dict):
    if all(isinstance(k, str) for k in obj) and _TAG not in obj:
      return {k: _encode(v) for k, v in obj.items()}
    return {_TAG: "dict", "items": [[_encode(k), _encode(v)] for k, v in obj.items()]}
  if isinstance(obj, tuple):
    return {_TAG: "tuple", "items": [_encode(v) for v in obj]}
  if isinstance(obj, list):
    return [_encode(v) for v in obj]
  if isinstance(obj, bytes):
    return {_TAG: "bytes", "hex": obj.hex()}
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, np.floating):
    return float(obj)
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  raise TypeError(f"iterator state holds a {type(obj).__name__}, which has no JSON form")


def _decode(obj: Any) -> Any:
  if isinstance(obj, list):
    return [_decode(v) for v in obj]
  if isinstance(obj, dict):
    tag = obj.get(_TAG)
    if tag is None:
      return {k: _decode(v) for k, v in obj.items()}
    if tag == "dict":
      return {_decode(k): _decode(v) for k, v in obj["items"]}
    if tag == "tuple":
      return tuple(_decode(v) for v in obj["items"])
    if tag == "bytes":
      return bytes.fromhex(obj["hex"])
    raise ValueError(f"unknown iterator-state tag {tag!r}")
  return obj


def iterator_state_to_json(state: dict) -> str:
  """An iterator's `get_state()` as JSON that `iterator_state_from_json` restores exactly."""
  return json.dumps(_encode(state), sort_keys=True)


def iterator_state_from_json(text: str) -> dict:
  return _decode(json.loads(text))
