"""Rewrites a bank in the current format (`tools/convert_bank.py`) without re-encoding, with its
router keys in the same or another key dtype:
- a format-3 bank loses its template-head K/V (format 4 does not store it: serving prefills the
  template head with every prompt, so that copy was never read);
- a format-2 bank loses it too, and its float32 router keys become bfloat16 by default;
- a current bank's keys move to another dtype (a float32 bank, kept to measure the agreement of
  low-precision keys, becomes a bfloat16 or int8 one).

The new bank is built in a temporary sibling of `out` and renamed into place, so `out` is complete
or absent; the source is only read, under its write lock (no append changes it mid-copy). Every
array the new format keeps is copied byte for byte with its checksums, except router keys that
change dtype: those are read segment by segment, checked against their checksums, quantised
(`router_keys.quantize` of their float32 values) and checksummed again over the same segments.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
from typing import Callable

import numpy as np

from msa_jax.atomic_dir import atomic_output_dir
from msa_jax.memory import manifest as mf
from msa_jax.memory import store
from msa_jax.memory.bank import checked_segments
from msa_jax.memory.errors import BankError
from msa_jax.memory.lock import BankLock
from msa_jax.model import router_keys

_KEY_ARRAYS = ("router_keys", store.KEY_SCALES)
_RETIRED_ARRAYS = ("template_k", "template_v")  # formats 2 and 3: the template head's K/V


def convert_bank(src: str, out: str, key_dtype: str | None = None, *,
                 log: Callable[[str], None] = print) -> mf.BankManifest:
  """Writes the bank at `src` (a complete one of format 2, 3 or current) to the new directory
  `out` in the current format with its router keys in `key_dtype` (default: the bank's own, but
  bfloat16 for a format-2 bank's float32 keys); returns the new manifest. Raises `BankError`,
  also when there is nothing to convert (a current bank, keys already in `key_dtype`)."""
  src = os.path.abspath(src)
  if key_dtype is not None and key_dtype not in router_keys.KEY_DTYPES:
    raise BankError(f"key dtype must be one of {router_keys.KEY_DTYPES}, got {key_dtype!r}")
  if os.path.lexists(out):
    raise BankError(f"{out} already exists; convert into a new directory")
  with BankLock(src, log):
    old = mf.read_manifest(src, (mf.FORMAT_VERSION,) + tuple(mf.CONVERTIBLE_VERSIONS))
    if not old.complete:
      raise BankError(f"bank {src}: its encoding was interrupted; resume it before converting")
    if key_dtype is None:
      key_dtype = (router_keys.DEFAULT_KEY_DTYPE if old.format_version == 2
                   else old.router_key_dtype)
    rekey = key_dtype != old.router_key_dtype
    if old.format_version == mf.FORMAT_VERSION and not rekey:
      raise BankError(f"bank {src} is already format {mf.FORMAT_VERSION} with {key_dtype} router "
                      f"keys: nothing to convert")
    dropped = _RETIRED_ARRAYS + (_KEY_ARRAYS if rekey else ())
    dtypes = {n: d for n, d in old.dtypes.items() if n not in dropped}
    if rekey:
      dtypes["router_keys"] = key_dtype
      if router_keys.has_scale(key_dtype):
        dtypes[store.KEY_SCALES] = "float32"
    new = dataclasses.replace(old, format_version=mf.FORMAT_VERSION, dtypes=dtypes,
                              checksums={n: c for n, c in old.checksums.items()
                                         if n not in dropped}, updated=mf.now())
    with atomic_output_dir(out) as tmp:
      shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=lambda d, names: [
          n for n in names if os.path.abspath(d) == src and n in dropped + (mf.MANIFEST_FILE,)])
      if rekey:
        _convert_keys(src, old, tmp, new)
      mf.write_manifest(tmp, new)
  log(f"converted {src} -> {out}: format {old.format_version} -> {mf.FORMAT_VERSION}, router "
      f"keys {old.router_key_dtype} -> {key_dtype}")
  return new


def _convert_keys(src: str, old: mf.BankManifest, dst: str, new: mf.BankManifest) -> None:
  """Writes `new`'s key arrays into `dst` from `old`'s in `src`, a checksummed segment at a time."""
  keys = store.open_array(src, "router_keys")
  shape = (keys.shape[0], old.num_chunks) + tuple(keys.shape[2:])
  shapes = {"router_keys": shape, store.KEY_SCALES: shape[:3]}
  targets = {name: store.create_array(dst, name, shapes[name], new.dtypes[name],
                                      store.chunk_shape_of(name, shapes[name], new.rows_per_chunk))
             for name in _KEY_ARRAYS if name in new.dtypes}
  for name in targets:
    new.checksums[name] = []
  scales = itertools.repeat(None)
  if store.KEY_SCALES in old.dtypes:
    scales = (rows for _, _, rows in checked_segments(
        src, old, store.open_array(src, store.KEY_SCALES), store.KEY_SCALES))
  for (start, stop, values), scale in zip(checked_segments(src, old, keys, "router_keys"), scales):
    out = router_keys.quantize(router_keys.dequantize(values, scale), new.router_key_dtype)
    for name, rows in zip(_KEY_ARRAYS, out):
      if rows is not None:
        rows = np.asarray(rows)
        targets[name][store.axis_slice(name, start, stop)].write(rows).result()
        new.checksums[name].append([start, stop, mf.rows_digest(rows)])
