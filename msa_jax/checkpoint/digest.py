"""Checksums of the files orbax writes for a checkpoint's parameters.

orbax stores no checksum of its own, so a flipped byte in a parameter file would load silently and
a truncated one fails deep inside its asynchronous reads. An msa_jax checkpoint directory records
the size and sha256 of every file under `params/` once it is saved, and loading checks them first:
a damaged or missing file is named before orbax reads anything.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os

from msa_jax.checkpoint.errors import CheckpointError


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      h.update(block)
  return h.hexdigest()


def files_digest(directory: str) -> dict[str, list]:
  """{path relative to `directory`: [size, sha256]} of every file under it (hashed in threads:
  hashlib releases the GIL on large reads)."""
  files = sorted(os.path.relpath(os.path.join(root, name), directory)
                 for root, _, names in os.walk(directory) for name in names)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    hashes = list(pool.map(lambda f: _sha256(os.path.join(directory, f)), files))
  return {f: [os.path.getsize(os.path.join(directory, f)), h] for f, h in zip(files, hashes)}


def verify_files(directory: str, expected: dict[str, list]) -> None:
  """Raises `CheckpointError` naming the first recorded file that is missing or differs."""
  for name, (size, digest) in sorted(expected.items()):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      problem = "is missing"
    elif os.path.getsize(path) != size:
      problem = f"has {os.path.getsize(path)} bytes, {size} were written"
    elif _sha256(path) != digest:
      problem = "does not match its checksum"
    else:
      continue
    raise CheckpointError(f"cannot restore {directory}: it is damaged or incomplete ({name} "
                          f"{problem})")
