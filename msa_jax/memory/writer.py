"""`BankWriter`: commits encoded batches to a bank directory, one atomic manifest update per batch.

A new bank is built in a temporary sibling directory and renamed into place at its first commit,
so a failed first batch leaves nothing behind (a killed one leaves the temporary directory, which
the next writer removes). Each commit grows the arrays, writes the batch's rows, waits for the
writes, then replaces the manifest (the commit point). A writer holds the bank's lock (`BankLock`)
throughout; reopening a bank for a resume or an append, under that lock, first cuts every array
back to its committed length, dropping rows a killed run wrote past its last commit (readers never
trim: the rows may be another writer's, in flight).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
from typing import Sequence

import numpy as np

from msa_jax.atomic_dir import temp_sibling_dir
from msa_jax.memory import manifest as mf
from msa_jax.memory import store
from msa_jax.memory.bank import committed_length
from msa_jax.memory.errors import BankError
from msa_jax.memory.lock import BankLock

DEFAULT_ROWS_PER_CHUNK = 256


@dataclasses.dataclass
class EncodedBatch:
  """One batch's documents in bank order: chunk arrays [L_r, n, Hkv, D] (rows in document order;
  router keys in the bank's key dtype, with scales [L_r, n, Hkv] for int8), each document's chunk
  count, display id and original text."""

  router_keys: np.ndarray
  content_k: np.ndarray
  content_v: np.ndarray
  doc_chunks: np.ndarray
  display_ids: np.ndarray
  texts: Sequence[str]
  router_key_scales: np.ndarray | None = None


def remove_stale_temps(path: str, lock: BankLock) -> list[str]:
  """Removes the temporary directories of encodes of `path` killed before their first commit
  (only the lock holder may: no other writer can be building one); returns them."""
  lock.check()
  path = os.path.abspath(path)
  stale = glob.glob(os.path.join(os.path.dirname(path),
                                 glob.escape(f".{os.path.basename(path)}.tmp-") + "*"))
  for tmp in stale:
    shutil.rmtree(tmp, ignore_errors=True)
  return stale


class BankWriter:

  def __init__(self, path: str, manifest: mf.BankManifest, lock: BankLock):
    lock.check()
    self.path = path
    self.manifest = manifest
    names = store.bank_arrays(manifest.dtypes)
    self._arrays = {name: store.open_array(path, name) for name in names}
    for name in names:
      self._arrays[name] = store.resize(self._arrays[name], name, committed_length(manifest, name))

  @classmethod
  def create(cls, path: str, manifest: mf.BankManifest, batch: EncodedBatch,
             session_digest: str, lock: BankLock) -> "BankWriter":
    """Builds the bank with its first batch under a temporary name, then renames it to `path`
    (which may be an empty directory)."""
    path = os.path.abspath(path)
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path)):
      raise BankError(f"cannot create a bank at {path}: it already exists")
    tmp = temp_sibling_dir(path)
    try:
      hkv_d = batch.content_k.shape[2:]
      layers = len(manifest.router_layers)
      shapes = {name: (layers, 0) + hkv_d for name in store.CHUNK_ARRAYS}
      if store.KEY_SCALES in manifest.dtypes:
        shapes[store.KEY_SCALES] = (layers, 0, hkv_d[0])
      shapes.update({"doc_chunk_offsets": (1,), "text_offsets": (1,), "display_ids": (0,),
                     "text": (0,)})
      arrays = {name: store.create_array(tmp, name, shape, manifest.dtypes[name],
                                         store.chunk_shape_of(name, shape,
                                                              manifest.rows_per_chunk))
                for name, shape in shapes.items()}
      initial = {"doc_chunk_offsets": np.zeros(1, np.int64), "text_offsets": np.zeros(1, np.int64)}
      for name, value in initial.items():
        arrays[name].write(value).result()
        manifest.checksums[name] = [[0, int(value.shape[0]), mf.rows_digest(value)]]
      for name in store.row_arrays(manifest.dtypes) + ("display_ids", "text"):
        manifest.checksums[name] = []
      mf.write_manifest(tmp, manifest)
      BankWriter(tmp, manifest, lock).commit(batch, session_digest)
      os.rename(tmp, path)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    return cls(path, manifest, lock)

  def commit(self, batch: EncodedBatch, session_digest: str) -> None:
    """Appends one batch of documents and commits it."""
    m = self.manifest
    n0, c0, t0 = m.num_docs, m.num_chunks, m.text_bytes
    text = "".join(batch.texts).encode("utf-8")
    text_lengths = [len(t.encode("utf-8")) for t in batch.texts]
    n1, c1, t1 = n0 + len(batch.doc_chunks), c0 + int(batch.doc_chunks.sum()), t0 + len(text)
    rows = {"router_keys": (c0, batch.router_keys), "content_k": (c0, batch.content_k),
            "content_v": (c0, batch.content_v),
            "doc_chunk_offsets": (n0 + 1, c0 + np.cumsum(batch.doc_chunks, dtype=np.int64)),
            "display_ids": (n0, batch.display_ids.astype(np.int64)),
            "text_offsets": (n0 + 1, t0 + np.cumsum(text_lengths, dtype=np.int64)),
            "text": (t0, np.frombuffer(text, np.uint8))}
    ends = {"router_keys": c1, "content_k": c1, "content_v": c1, "doc_chunk_offsets": n1 + 1,
            "display_ids": n1, "text_offsets": n1 + 1, "text": t1}
    if batch.router_keys.dtype.name != m.router_key_dtype or (
        (store.KEY_SCALES in self._arrays) != (batch.router_key_scales is not None)):
      raise BankError(f"internal error: router keys of dtype {batch.router_keys.dtype} for a bank "
                      f"of {m.router_key_dtype} keys")
    if batch.router_key_scales is not None:
      rows[store.KEY_SCALES], ends[store.KEY_SCALES] = (c0, batch.router_key_scales), c1
    futures = []
    for name, (start, values) in rows.items():
      self._arrays[name] = store.resize(self._arrays[name], name, ends[name])
      stop = start + values.shape[store.grow_axis(name)]
      if stop > start:
        futures.append(self._arrays[name][store.axis_slice(name, start, stop)].write(values))
      m.checksums[name].append([start, stop, mf.rows_digest(values)])
    for future in futures:
      future.result()
    m.num_docs, m.num_chunks, m.text_bytes = n1, c1, t1
    if m.encoding is not None:
      m.encoding.digest = session_digest
    m.updated = mf.now()
    mf.write_manifest(self.path, m)

  def display_ids(self) -> np.ndarray:
    """The committed documents' display ids."""
    return store.read(self.path, self._arrays["display_ids"], "display_ids",
                      (slice(0, self.manifest.num_docs),))

  def start_session(self, session: mf.EncodingSession) -> None:
    """Marks an append as in progress (committed before its first batch, so a kill is resumable)."""
    self.manifest.encoding = session
    self.manifest.updated = mf.now()
    mf.write_manifest(self.path, self.manifest)

  def finish(self) -> None:
    """Marks the bank complete."""
    self.manifest.encoding = None
    self.manifest.updated = mf.now()
    mf.write_manifest(self.path, self.manifest)
