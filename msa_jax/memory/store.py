"""The bank's arrays on disk: tensorstore zarr3, each growing along one axis as batches commit.

  router_keys, content_k, content_v  [L_r, C, Hkv, D]  grow along C; storage chunks [1, R, Hkv, D]
                                                        (R = rows_per_chunk) for row-range reads;
                                                        router keys in the bank's key dtype
                                                        (`msa_jax.model.router_keys`)
  router_key_scales                  [L_r, C, Hkv]     float32, only beside int8 router keys
  doc_chunk_offsets, text_offsets    [N + 1] int64     CSR offsets (chunk rows; text bytes)
  display_ids                        [N] int64
  text                               [bytes] uint8     the documents' UTF-8 text, concatenated

Every storage chunk ends with a crc32c codec, so a flipped or truncated chunk file fails its read
with DATA_LOSS, and arrays open with `fill_missing_data_reads=false`, so a deleted chunk file fails
too instead of reading as zeros. Either becomes a `BankError`. For that, every chunk is stored, even
one equal to the fill value (the display ids [0] of a one-document bank are all zeros).
"""

from __future__ import annotations

import os

import numpy as np
import tensorstore as ts

from msa_jax.memory.errors import BankError

CHUNK_ARRAYS = ("router_keys", "content_k", "content_v")
INDEX_ARRAYS = ("doc_chunk_offsets", "display_ids", "text_offsets")
TEXT_ARRAY = "text"
ALL_ARRAYS = CHUNK_ARRAYS + INDEX_ARRAYS + (TEXT_ARRAY,)  # in every bank
KEY_SCALES = "router_key_scales"
_INDEX_CHUNK = 65536
_TEXT_CHUNK = 1 << 20


def row_arrays(dtypes) -> tuple[str, ...]:
  """The arrays of a bank with these array dtypes (the manifest's) that hold one row per chunk."""
  return CHUNK_ARRAYS + ((KEY_SCALES,) if KEY_SCALES in dtypes else ())


def bank_arrays(dtypes) -> tuple[str, ...]:
  """Every array of a bank with these array dtypes."""
  return ALL_ARRAYS + ((KEY_SCALES,) if KEY_SCALES in dtypes else ())


def grow_axis(name: str) -> int:
  """The axis an array grows along as documents commit."""
  return 1 if name in CHUNK_ARRAYS + (KEY_SCALES,) else 0


def _kvstore(bank_dir: str, name: str) -> dict:
  return {"driver": "file", "path": os.path.join(bank_dir, name)}


def create_array(bank_dir: str, name: str, shape, dtype: str, chunk_shape) -> ts.TensorStore:
  spec = {
      "driver": "zarr3", "kvstore": _kvstore(bank_dir, name), "create": True,
      "store_data_equal_to_fill_value": True,
      "metadata": {
          "shape": list(shape), "data_type": dtype,
          "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk_shape)}},
          "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
      },
  }
  return ts.open(spec).result()


def open_array(bank_dir: str, name: str) -> ts.TensorStore:
  if not os.path.exists(os.path.join(bank_dir, name, "zarr.json")):
    raise BankError(f"bank {bank_dir}: array {name} is missing ({os.path.join(bank_dir, name)} "
                    f"has no zarr.json)")
  spec = {"driver": "zarr3", "kvstore": _kvstore(bank_dir, name), "open": True,
          "fill_missing_data_reads": False, "store_data_equal_to_fill_value": True}
  try:
    return ts.open(spec).result()
  except ValueError as e:
    raise BankError(f"bank {bank_dir}: cannot open array {name}: {e}") from None


def chunk_shape_of(name: str, shape, rows_per_chunk: int) -> tuple[int, ...]:
  if grow_axis(name) == 1:
    return (1, rows_per_chunk) + tuple(shape[2:])
  return (_TEXT_CHUNK if name == TEXT_ARRAY else _INDEX_CHUNK,)


def axis_slice(name: str, start: int, stop: int) -> tuple:
  """An index selecting rows [start, stop) along `name`'s growing axis."""
  return (slice(None),) * grow_axis(name) + (slice(start, stop),)


def read(bank_dir: str, array: ts.TensorStore, name: str, index) -> np.ndarray:
  """`array[index]` as numpy; storage failures (checksum mismatch, missing chunk) -> BankError."""
  try:
    return array[index].read().result()
  except ValueError as e:
    raise BankError(f"bank {bank_dir}: array {name} is corrupt or incomplete: {e}") from None


def resize(array: ts.TensorStore, name: str, length: int) -> ts.TensorStore:
  """`array` with its growing axis set to `length` (data past it is dropped)."""
  axis = grow_axis(name)
  bound = [None] * array.rank
  bound[axis] = length
  return array.resize(exclusive_max=bound).result()
