"""Greedy decoding by full re-forward over a fixed-size buffer.

The memory-free path of `experiments/generate.py --prompt` (a converted Qwen3 with no bank): the
engine (`engine.py`) needs a memory view for a model with router layers. It compiles once per
(prompt length + budget) and is only meant for tiny models (quick start, smoke tests).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np


def greedy_generate(loaded, prompt_ids: Sequence[int], max_new_tokens: int,
                    stop_ids: Sequence[int] = ()) -> list[int]:
  """Returns the generated ids (without the prompt), stopping early at any of `stop_ids`."""
  if not prompt_ids:
    raise ValueError("greedy_generate needs a non-empty prompt")
  n = len(prompt_ids)
  buffer = np.zeros((1, n + max_new_tokens), np.int32)
  buffer[0, :n] = prompt_ids
  out = []
  for step in range(max_new_tokens):
    # later buffer slots are zeros; causal attention keeps them from affecting position n+step-1
    logits = loaded.logits(jnp.asarray(buffer))
    token = int(jnp.argmax(logits[0, n + step - 1]))
    out.append(token)
    if token in stop_ids:
      break
    buffer[0, n + step] = token
  return out
