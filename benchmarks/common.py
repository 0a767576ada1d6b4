"""What every benchmark shares: the settings error, device peaks, OOM detection, memory stats and
parameter sizes, and where the repository's shipped files are."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp

# The repository root: `benchmarks/` sits next to `msa_jax/`, `experiments/` and `models/` in a checkout
# (or an editable install of one).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense (no sparsity) bf16 peak FLOP/s per chip, matched against `device.device_kind` by substring,
# the first match winning (so the specific spellings come first).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),   # SXM; "NVIDIA H100 80GB HBM3"
    ("H200", 989e12),   # the H100 compute die with more, faster memory
    ("H800", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
)


class BenchError(ValueError):
  """The benchmark settings cannot form a valid workload."""


def repo_file(*parts: str) -> str:
  """The absolute path of a file shipped in the repository checkout, e.g. ("models", "tiny_msa",
  "tokenizer.json"): never relative to the working directory or to a module's depth in the tree."""
  return os.path.join(REPO_ROOT, *parts)


def require_file(path: str, flag: str) -> str:
  """`path` if it is a file, else a BenchError that names the flag to set."""
  if not os.path.isfile(path):
    raise BenchError(f"no file at {path}: pass --{flag} (the default is the copy shipped in a "
                     f"repository checkout)")
  return path


def peak_bf16_flops(device_kind: str) -> float | None:
  """The dense bf16 peak of one chip of this kind, or None when unknown (CPU included)."""
  for key, value in PEAK_BF16_FLOPS:
    if key.lower() in device_kind.lower():
      return value
  return None


def count_params(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def tree_bytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def is_oom(error: BaseException) -> bool:
  text = str(error)
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                 "OutOfMemory", "Resource exhausted"))


def memory_stats(device) -> dict[str, int] | None:
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - some backends raise instead of returning None
    return None
  return dict(stats) if stats else None
