"""What the generation engine takes and returns: the contract between the engine (`engine.py`), the
Memory Interleave driver and the binaries.

A `Request` is one active context on token ids: the template head first (its first
`MSAConfig.template_len` tokens, memory-blind, positions 0..T-1), then everything else (positions from
`MSAConfig.question_position`). `route_mask` marks the tokens whose router queries score the memory
(the question in round one; the question plus the newest injected documents later).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Request:
  tokens: Sequence[int]
  route_mask: Sequence[bool]
  max_new_tokens: int
  stop_ids: Sequence[int] = ()


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 is greedy; otherwise temperature then nucleus (top_p) sampling."""

  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class LayerRouting:
  """One router layer's choice for one request: memory document indices (0-based rows of the
  view/bank, best first) and their router scores; `k_eff` entries are valid."""

  layer: int
  doc_index: np.ndarray
  scores: np.ndarray


@dataclasses.dataclass(frozen=True)
class Generation:
  tokens: list[int]  # new tokens; the stop token is included when one was hit
  stopped: bool  # a stop id ended it (else max_new_tokens did)
  routing: list[LayerRouting]  # per router layer, from the prefill of this request
