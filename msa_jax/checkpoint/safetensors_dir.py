"""Reading and writing Hugging Face safetensors directories, one tensor at a time.

A directory holds `model.safetensors`, or shards listed by `model.safetensors.index.json`. Reading is
lazy (safetensors memory-maps; a tensor is copied out only when asked for), so a converter holds at
most one model copy plus one tensor. Writing streams tensors into shards of bounded size.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from msa_jax.checkpoint.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsDir:
  """Lazy tensor access over a single-file or sharded safetensors directory.

  Use as a context manager; every file is opened (and its header validated) on entry.
  """

  def __init__(self, path: str):
    self.path = path
    if not os.path.isdir(path):
      raise CheckpointError(f"checkpoint directory does not exist: {path}")
    index_path = os.path.join(path, INDEX_FILE)
    single_path = os.path.join(path, SINGLE_FILE)
    if os.path.exists(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"corrupt shard index {index_path}: {type(e).__name__}: {e}") from e
      if not (isinstance(weight_map, dict)
              and all(isinstance(f, str) for f in weight_map.values())):
        raise CheckpointError(f"corrupt shard index {index_path}: weight_map must map tensor names "
                              f"to shard file names, got {str(weight_map)[:200]}")
      self._file_of = dict(weight_map)
      missing = sorted({f for f in self._file_of.values()
                        if not os.path.exists(os.path.join(path, f))})
      if missing:
        raise CheckpointError(f"{index_path} names shard files that are missing: {missing}")
    elif os.path.exists(single_path):
      self._file_of = None
    else:
      raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
    self._handles = {}

  def __enter__(self):
    files = sorted(set(self._file_of.values())) if self._file_of is not None else [SINGLE_FILE]
    for name in files:
      full = os.path.join(self.path, name)
      try:
        self._handles[name] = safe_open(full, "np").__enter__()
      except (SafetensorError, OSError) as e:
        raise CheckpointError(f"corrupt or unreadable safetensors file {full}: {e}") from e
    if self._file_of is None:
      self._file_of = {k: SINGLE_FILE for k in self._handles[SINGLE_FILE].keys()}
    else:
      for name, handle in self._handles.items():
        listed = {k for k, f in self._file_of.items() if f == name}
        absent = sorted(listed - set(handle.keys()))
        if absent:
          raise CheckpointError(f"shard {name} lacks tensors its index lists: {absent[:20]}")
    return self

  def __exit__(self, *exc):
    for handle in self._handles.values():
      handle.__exit__(None, None, None)
    self._handles = {}

  def names(self) -> list[str]:
    return list(self._file_of)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    file = self._file_of[name]
    try:
      return self._handles[file].get_tensor(name)
    except (SafetensorError, OSError) as e:
      raise CheckpointError(f"cannot read tensor {name} from {os.path.join(self.path, file)}: {e}") \
          from e


def write_safetensors_dir(path: str, tensors: Iterable[tuple[str, np.ndarray]],
                          max_shard_bytes: int = 2 << 30) -> None:
  """Streams (name, array) pairs into `path` (which must exist): one file, or shards plus an index
  when the total exceeds `max_shard_bytes`. At most one shard is held in memory."""
  shards: list[tuple[str, list[str]]] = []
  pending: dict[str, np.ndarray] = {}
  pending_bytes = 0
  total = 0

  def flush():
    nonlocal pending, pending_bytes
    name = f"shard-{len(shards):05d}.safetensors"
    save_file(pending, os.path.join(path, name), metadata={"format": "pt"})
    shards.append((name, list(pending)))
    pending, pending_bytes = {}, 0

  for name, array in tensors:
    array = np.asarray(array)
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into 1-d)
      array = array.copy(order="C")
    if pending and pending_bytes + array.nbytes > max_shard_bytes:
      flush()
    pending[name] = array
    pending_bytes += array.nbytes
    total += array.nbytes
  if pending or not shards:
    flush()
  if len(shards) == 1:
    os.replace(os.path.join(path, shards[0][0]), os.path.join(path, SINGLE_FILE))
    return
  n = len(shards)
  weight_map = {}
  for i, (old, names) in enumerate(shards):
    new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    os.replace(os.path.join(path, old), os.path.join(path, new))
    weight_map.update({t: new for t in names})
  with open(os.path.join(path, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
