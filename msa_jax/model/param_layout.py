"""Conversions between the per-layer parameter layout (`layers_{i}`) and the scanned one (`block_{a}_{b}`,
stacked along a leading axis). Checkpoints are stored per layer, the layout Hugging Face uses too, so
one checkpoint serves both `scan_layers` settings.
"""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from msa_jax.model.model import layer_blocks

_BLOCK = re.compile(r"block_(\d+)_(\d+)$")


def _stack(trees):
  first = trees[0]
  if isinstance(first, dict):
    return {k: _stack([t[k] for t in trees]) for k in first}
  return (np if isinstance(first, np.ndarray) else jnp).stack(trees)


def _index(tree, i):
  if isinstance(tree, dict):
    return {k: _index(v, i) for k, v in tree.items()}
  return tree[i]


def stack_layers(params: dict[str, Any], num_layers: int, router_layers) -> dict[str, Any]:
  """Per-layer layout -> scanned layout. Keys other than `layers_{i}` pass through unchanged."""
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  for start, end, _ in layer_blocks(num_layers, router_layers):
    missing = [f"layers_{i}" for i in range(start, end) if f"layers_{i}" not in params]
    if missing:
      raise KeyError(f"parameters lack {missing}")
    out[f"block_{start}_{end}"] = _stack([params[f"layers_{i}"] for i in range(start, end)])
  return out


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
  """Scanned layout -> per-layer layout (no-op for a tree that is already per layer)."""
  out = {}
  for key, value in params.items():
    m = _BLOCK.match(key)
    if not m:
      out[key] = value
      continue
    start, end = int(m.group(1)), int(m.group(2))
    for i in range(start, end):
      out[f"layers_{i}"] = _index(value, i - start)
  return out


def to_model_layout(params: dict[str, Any], config, router_layers) -> dict[str, Any]:
  """Per-layer params in the layout `Qwen3Decoder(config, router_layers)` expects."""
  if config.scan_layers:
    return stack_layers(params, config.num_layers, router_layers)
  return params
