"""The training configuration: model, data, phases, optimiser, mesh and checkpoints, read from JSON.

A run is a sequence of phases (MSA_PAPER.md §2.3-2.4): the router warm-up (0.1·LM + aux at a higher
learning rate, optionally router-only), then the main phase (LM + 0.1·aux), each with its own
schedule and memory size, so the SFT curriculum's growing memory context is a list of phases too.
Config files live in `experiments/configs/`; `--set a.b=value` overrides any field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

from msa_jax.data.synthetic import TASKS
from msa_jax.text_files import read_utf8

TRAINABLE = ("all", "router")


class TrainConfigError(ValueError):
  """A training configuration is invalid; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """preset: a config preset (`tiny`, `msa-4b`, ...) with `overrides` of its fields; or init_from:
  an msa_jax checkpoint directory (or HF directory) whose weights start the run."""

  preset: str = "tiny"
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  msa_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  init_from: str = ""
  vocab_from_tokenizer: bool = True


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """source: `synthetic` (tasks mixed by weight), `jsonl` (path) or `official` (memory_path +
  queries_path). batch_size is global (split over processes)."""

  source: str = "synthetic"
  tasks: Mapping[str, float] = dataclasses.field(default_factory=lambda: {"fact_lookup": 1.0})
  path: str = ""
  memory_path: str = ""
  queries_path: str = ""
  allow_pickle: bool = False
  tokenizer: str = "world"
  min_doc_tokens: int = 16
  max_doc_tokens: int = 1024
  # a share of synthetic records whose documents run to long_max_doc_tokens instead: short
  # documents give many distractors per memory, long ones keep copying from long text
  long_doc_fraction: float = 0.0
  long_max_doc_tokens: int = 0
  # synthetic fact-lookup and multi-hop memories: this many distractors are near-namesakes of a
  # gold subject (hard negatives for the router; tasks.py's module doc)
  name_negatives: int = 0
  # ... and each retrieved card is injected among up to this many distractor cards (tasks.py)
  context_distractors: int = 0
  # ... and before each hop's round, wrong-card rounds with this probability (geometric, tasks.py)
  miss_rate: float = 0.0
  # synthetic niah_multi_key memories hold this many needles of different keys (0: the task's 4);
  # many needles in one memory make the router tell them apart by the key alone
  niah_keys: int = 0
  # synthetic needle memories: this share of the distractors are fact cards, not haystack prose
  # (a needle question then routes past people's cards, as in the demo's shared memory)
  card_distractors: float = 0.0
  num_records: int = 1_000_000
  doc_id_max: int = 0  # > 0: synthetic memories are random subsets of a bank of up to this size
  answer_fraction: float | None = None  # share of answer steps (None: uniform over steps)
  batch_size: int = 8
  prompt_buckets: Sequence[int] = (128, 256, 512)
  max_docs: int = 64
  worker_count: int = 0
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
  """One training phase: its steps, loss weights, learning-rate schedule (linear warm-up then
  cosine to end_lr), what trains, and the memory size of its samples (memory_tokens per sample,
  padded to one of mem_buckets).

  Loss weights (`losses.LossWeights` says what each term is): lm_weight, aux_weight and
  answer_weight weigh the official terms (answer_weight None: the model's answer_loss_weight, so
  a converted config's holds); memory_lm_weight, context_lm_weight and prompt_dense_weight are
  training-signal options, 0 = off. lm_weight = aux_weight = 0 with memory_lm_weight > 0 is an LM
  pre-phase over the memory's documents."""

  name: str
  steps: int
  peak_lr: float
  end_lr: float
  warmup_steps: int = 0
  lm_weight: float = 1.0
  aux_weight: float = 0.1
  answer_weight: float | None = None
  memory_lm_weight: float = 0.0
  context_lm_weight: float = 0.0
  prompt_dense_weight: float = 0.0
  trainable: str = "all"
  memory_tokens: int = 4096
  mem_buckets: Sequence[int] = ()

  @property
  def buckets(self) -> tuple[int, ...]:
    return tuple(self.mem_buckets) or (self.memory_tokens,)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  phases: tuple[PhaseConfig, ...] = ()
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  mesh: Sequence[int] = (-1, 1, 1)
  seed: int = 0
  ce_chunk_size: int = 1024
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  log_every: int = 10

  @property
  def total_steps(self) -> int:
    return sum(p.steps for p in self.phases)

  def phase_at(self, step: int) -> tuple[int, int]:
    """(phase index, step within the phase) of global step `step`."""
    start = 0
    for i, phase in enumerate(self.phases):
      if step < start + phase.steps:
        return i, step - start
      start += phase.steps
    return len(self.phases) - 1, self.phases[-1].steps

  def phase_start(self, index: int) -> int:
    return sum(p.steps for p in self.phases[:index])


def _build(cls, values: Mapping[str, Any], where: str):
  if not isinstance(values, Mapping):
    raise TrainConfigError(f"{where} must be an object, got {type(values).__name__}")
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise TrainConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
  try:
    return cls(**values)
  except TypeError as e:
    raise TrainConfigError(f"{where}: {e}") from None


def _validate(cfg: TrainConfig) -> TrainConfig:
  if not cfg.phases:
    raise TrainConfigError("phases: a run needs at least one phase")
  for i, p in enumerate(cfg.phases):
    where = f"phases[{i}] ({p.name})"
    if p.steps <= 0:
      raise TrainConfigError(f"{where}: steps must be positive, got {p.steps}")
    if p.trainable not in TRAINABLE:
      raise TrainConfigError(f"{where}: trainable must be one of {TRAINABLE}, got {p.trainable!r}")
    if not 0 <= p.warmup_steps <= p.steps:
      raise TrainConfigError(f"{where}: warmup_steps {p.warmup_steps} not in [0, steps]")
    if p.peak_lr <= 0 or p.end_lr < 0:
      raise TrainConfigError(f"{where}: learning rates must be positive (peak {p.peak_lr}, "
                             f"end {p.end_lr})")
    weights = {"lm_weight": p.lm_weight, "aux_weight": p.aux_weight,
               "answer_weight": p.answer_weight or 0.0, "memory_lm_weight": p.memory_lm_weight,
               "context_lm_weight": p.context_lm_weight,
               "prompt_dense_weight": p.prompt_dense_weight}
    negative = sorted(k for k, v in weights.items() if v < 0)
    if negative:
      raise TrainConfigError(f"{where}: loss weights must be >= 0, got negative {negative}")
    if max(p.buckets) < p.memory_tokens:
      raise TrainConfigError(f"{where}: memory_tokens {p.memory_tokens} exceeds the largest "
                             f"bucket {max(p.buckets)}")
  if cfg.data.source not in ("synthetic", "jsonl", "official"):
    raise TrainConfigError(f"data.source must be synthetic, jsonl or official, got "
                           f"{cfg.data.source!r}")
  unknown = sorted(set(cfg.data.tasks) - set(TASKS))
  if cfg.data.source == "synthetic" and unknown:
    raise TrainConfigError(f"data.tasks: unknown synthetic task(s) {unknown}; known: "
                           f"{', '.join(TASKS)}")
  d = cfg.data
  if not 0.0 <= d.long_doc_fraction <= 1.0:
    raise TrainConfigError(f"data.long_doc_fraction must be in [0, 1], got {d.long_doc_fraction}")
  if d.long_doc_fraction and d.long_max_doc_tokens <= d.max_doc_tokens:
    raise TrainConfigError(f"data.long_max_doc_tokens ({d.long_max_doc_tokens}) must exceed "
                           f"data.max_doc_tokens ({d.max_doc_tokens}) when long_doc_fraction > 0")
  if not 0.0 <= d.miss_rate < 1.0:
    raise TrainConfigError(f"data.miss_rate must be in [0, 1), got {d.miss_rate}")
  for name in ("name_negatives", "context_distractors", "miss_rate"):
    value = getattr(d, name)
    if value < 0:
      raise TrainConfigError(f"data.{name} must be >= 0, got {value}")
    if value and not {"fact_lookup", "multi_hop"} & set(d.tasks):
      raise TrainConfigError(f"data.{name} needs a fact_lookup or multi_hop task in data.tasks, "
                             f"got {sorted(d.tasks)}")
  if d.niah_keys < 0:
    raise TrainConfigError(f"data.niah_keys must be >= 0, got {d.niah_keys}")
  if d.niah_keys and "niah_multi_key" not in d.tasks:
    raise TrainConfigError(f"data.niah_keys needs the niah_multi_key task in data.tasks, got "
                           f"{sorted(d.tasks)}")
  if not 0.0 <= d.card_distractors < 1.0:
    raise TrainConfigError(f"data.card_distractors must be in [0, 1), got {d.card_distractors}")
  if d.card_distractors and not any(t.startswith("niah_") for t in d.tasks):
    raise TrainConfigError(f"data.card_distractors needs a needle (niah_*) task in data.tasks, "
                           f"got {sorted(d.tasks)}")
  if cfg.data.batch_size <= 0:
    raise TrainConfigError(f"data.batch_size must be positive, got {cfg.data.batch_size}")
  if len(cfg.mesh) != 3:
    raise TrainConfigError(f"mesh must give (data, fsdp, tensor), got {list(cfg.mesh)}")
  return cfg


def config_from_dict(d: Mapping[str, Any]) -> TrainConfig:
  """A validated TrainConfig from a plain dict (a parsed JSON config file)."""
  d = dict(d)
  sections = {"model": ModelSpec, "data": DataConfig, "optimizer": OptimizerConfig}
  for key, cls in sections.items():
    if key in d:
      d[key] = _build(cls, d[key], key)
  if "phases" in d:
    if not isinstance(d["phases"], list):
      raise TrainConfigError("phases must be a list of objects")
    d["phases"] = tuple(_build(PhaseConfig, p, f"phases[{i}]") for i, p in enumerate(d["phases"]))
  return _validate(_build(TrainConfig, d, "config"))


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _parse_value(text: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text  # a bare string


def apply_overrides(d: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
  """Applies `a.b.c=value` overrides (value parsed as JSON, else a string); list items by index
  (`phases.1.steps=100`)."""
  d = json.loads(json.dumps(d))
  for item in overrides:
    if "=" not in item:
      raise TrainConfigError(f"override {item!r} is not of the form key.path=value")
    path, value = item.split("=", 1)
    keys = path.split(".")
    node = d
    try:
      for k in keys[:-1]:
        if isinstance(node, list):
          node = node[int(k)]
        else:
          node = node.setdefault(k, {})
      last = keys[-1]
      if isinstance(node, list):
        node[int(last)] = _parse_value(value)
      else:
        node[last] = _parse_value(value)
    except (IndexError, ValueError, TypeError, AttributeError) as e:
      raise TrainConfigError(f"override {item!r}: {path} is not a field of the config "
                             f"({type(e).__name__}: {e})") from None
  return d


def load_train_config(path: str, overrides: Sequence[str] = ()) -> TrainConfig:
  """Reads a JSON config file and applies overrides."""
  if not os.path.exists(path):
    raise TrainConfigError(f"config file not found: {path}")
  try:
    d = json.loads(read_utf8(path, TrainConfigError))
  except json.JSONDecodeError as e:
    raise TrainConfigError(f"{path} is not valid JSON: {e}") from None
  return config_from_dict(apply_overrides(d, overrides))
