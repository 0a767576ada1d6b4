"""`open_bank`: an encoded bank, validated, as a read-only `Bank`.

Opening checks the manifest, that every array exists with the committed sizes and dtypes, the
index arrays (offsets, display ids, text offsets) against their checksums and invariants, and,
when configs (and params) are given, that this model built the bank. The chunk arrays and the text
are verified against their checksums when `verify="full"`, or with the default `verify="auto"` when
the bank is at most `AUTO_VERIFY_BYTES`; a larger bank is not read in full at open, but each
storage chunk carries a crc32c that every read checks, so corruption still surfaces as a
`BankError` rather than as garbage.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from msa_jax import config as cfglib
from msa_jax.memory import manifest as mf
from msa_jax.memory import store
from msa_jax.memory.errors import BankError
from msa_jax.model import router_keys

AUTO_VERIFY_BYTES = 512 << 20
VERIFY_MODES = ("auto", "full", "index")


class Bank:
  """An opened, validated bank (read-only; documents are added through the encoder's append).

  Documents are 0-based rows in insertion order; document i owns chunk rows
  `doc_chunk_offsets[i]:doc_chunk_offsets[i+1]` of every chunk array, and `display_ids[i]` is the
  id the model reads and writes as "[id]". Chunk arrays are indexed by r =
  `router_layers.index(layer)`: "router_keys" (chunk means of the raw router keys, not normalised,
  in the bank's `router_key_dtype`; int8 keys have float32 scales [C, Hkv] in "router_key_scales",
  see `msa_jax.model.router_keys`), "content_k" / "content_v" (chunk means of post-RoPE keys at
  document-local positions / of values, in the model's compute dtype).
  """

  def __init__(self, path: str, manifest: mf.BankManifest, arrays: dict,
               doc_chunk_offsets: np.ndarray, display_ids: np.ndarray, text_offsets: np.ndarray):
    self.path = path
    self.manifest = manifest
    self.router_layers = manifest.router_layers
    self.num_docs = manifest.num_docs
    self.num_chunks = manifest.num_chunks
    self.doc_chunk_offsets = doc_chunk_offsets
    self.display_ids = display_ids
    self._text_offsets = text_offsets
    self._arrays = arrays
    self._index = {int(d): i for i, d in enumerate(display_ids)}
    self._row_arrays = store.row_arrays(manifest.dtypes)

  def __repr__(self) -> str:
    return (f"Bank({self.path!r}, {self.num_docs} documents, {self.num_chunks} chunks, router "
            f"layers {list(self.router_layers)})")

  @property
  def router_key_dtype(self) -> str:
    return self.manifest.router_key_dtype

  @property
  def chunk_shape(self) -> tuple[int, int]:
    """(Hkv, D) of one stored chunk row."""
    return tuple(self._arrays["router_keys"].shape[2:])

  def array_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every stored array's (shape, dtype name); growing arrays may hold uncommitted rows past
    the manifest's counts."""
    return {name: (tuple(a.shape), a.dtype.name) for name, a in self._arrays.items()}

  def _chunk_array(self, name: str, r: int):
    if name not in self._row_arrays:
      raise KeyError(f"unknown bank array {name!r}; chunk arrays are {self._row_arrays}")
    if not 0 <= r < len(self.router_layers):
      raise IndexError(f"router layer index r={r} outside [0, {len(self.router_layers)})")
    return self._arrays[name]

  def read(self, name: str, r: int, start: int, stop: int) -> np.ndarray:
    """Chunk rows [start, stop) of router layer r -> [stop - start, Hkv, D] ([.., Hkv] for
    scales)."""
    array = self._chunk_array(name, r)
    if not 0 <= start <= stop <= self.num_chunks:
      raise IndexError(f"chunk rows [{start}, {stop}) outside [0, {self.num_chunks}]")
    return store.read(self.path, array, name, (r, slice(start, stop)))

  def read_rows(self, name: str, r: int, rows) -> np.ndarray:
    """Arbitrary chunk rows (int [n]; repeats allowed, order kept) of router layer r
    -> [n, Hkv, D]."""
    array = self._chunk_array(name, r)
    rows = np.asarray(rows, np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= self.num_chunks):
      bad = rows[(rows < 0) | (rows >= self.num_chunks)]
      raise IndexError(f"chunk rows outside [0, {self.num_chunks}): {bad[:5].tolist()}")
    if not rows.size:
      return np.zeros((0,) + tuple(array.shape[2:]), array.dtype.numpy_dtype)
    try:
      return array[r].oindex[rows].read().result()
    except ValueError as e:
      raise BankError(f"bank {self.path}: array {name} is corrupt or incomplete: {e}") from None

  def doc_chunks(self, i: int) -> tuple[int, int]:
    """The chunk rows [start, stop) of document i."""
    self._check_doc(i)
    return int(self.doc_chunk_offsets[i]), int(self.doc_chunk_offsets[i + 1])

  def document_text(self, i: int) -> str:
    """The original (unwrapped) text of document i."""
    self._check_doc(i)
    start, stop = int(self._text_offsets[i]), int(self._text_offsets[i + 1])
    data = store.read(self.path, self._arrays[store.TEXT_ARRAY], store.TEXT_ARRAY,
                      (slice(start, stop),))
    try:
      return data.tobytes().decode("utf-8")
    except UnicodeDecodeError as e:
      raise BankError(f"bank {self.path}: the text of document {i} is not valid UTF-8 "
                      f"({e})") from None

  def index_of(self, display_id: int) -> int | None:
    """The document index of a display id, or None if no document has it."""
    return self._index.get(int(display_id))

  def _check_doc(self, i: int) -> None:
    if not 0 <= i < self.num_docs:
      raise IndexError(f"document {i} outside [0, {self.num_docs})")


def open_bank(path: str, model_config: cfglib.ModelConfig | None = None,
              msa_config: cfglib.MSAConfig | None = None, *, params=None, verify: str = "auto",
              allow_incomplete: bool = False) -> Bank:
  """Opens and validates the bank at `path` (see the module doc for what `verify` checks).

  With `model_config`/`msa_config`, refuses a bank encoded under another configuration; with
  `params` too, one encoded with other weights. A bank whose encode was interrupted is refused
  unless `allow_incomplete` (it then holds the committed documents). Raises `BankError`.
  """
  if verify not in VERIFY_MODES:
    raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
  manifest = mf.read_manifest(path)
  if not manifest.complete and not allow_incomplete:
    raise BankError(f"bank {path}: encoding was interrupted after {manifest.num_docs} documents; "
                    f"run the same encode command again to resume it (or open with "
                    f"allow_incomplete=True to read the committed documents)")
  if (model_config is None) != (msa_config is None):
    raise ValueError("pass both model_config and msa_config, or neither")
  if model_config is not None:
    check_model(path, manifest, model_config, msa_config, params)
  arrays = {name: store.open_array(path, name) for name in store.bank_arrays(manifest.dtypes)}
  _check_shapes(path, manifest, arrays)
  full = verify == "full" or (verify == "auto" and chunk_bytes(manifest) <= AUTO_VERIFY_BYTES)
  for name in store.INDEX_ARRAYS:
    verify_array(path, manifest, arrays[name], name)
  if full:
    for name in store.row_arrays(manifest.dtypes) + (store.TEXT_ARRAY,):
      verify_array(path, manifest, arrays[name], name)
  offsets, ids, text_offsets = (
      store.read(path, arrays[name], name, (slice(0, n),)) for name, n in
      (("doc_chunk_offsets", manifest.num_docs + 1), ("display_ids", manifest.num_docs),
       ("text_offsets", manifest.num_docs + 1)))
  _check_index(path, manifest, offsets, ids, text_offsets)
  return Bank(path, manifest, arrays, offsets, ids, text_offsets)


def check_model(path: str, manifest: mf.BankManifest, model_config, msa_config,
                params=None) -> None:
  """Raises `BankError` unless the bank was encoded by this configuration (and these params)."""
  if mf.config_fingerprint(model_config, msa_config) != manifest.config_fingerprint:
    diff = mf.config_mismatch(manifest, model_config, msa_config)
    detail = "; ".join(diff) if diff else "its recorded fingerprint does not match its config"
    raise BankError(f"bank {path} was encoded by another model configuration ({detail}); "
                    f"encode the corpus again with this model")
  if params is not None and mf.params_fingerprint(params) != manifest.params_fingerprint:
    raise BankError(f"bank {path} was encoded with other model weights (parameter fingerprint "
                    f"{manifest.params_fingerprint[:16]}..., these are "
                    f"{mf.params_fingerprint(params)[:16]}...); encode the corpus again with this "
                    f"checkpoint")


def chunk_bytes(manifest: mf.BankManifest) -> int:
  """Bytes of the chunk arrays and the text: what a full verification reads."""
  model, _ = manifest.configs()
  row = model.num_kv_heads * model.head_dim
  per_row = sum(jnp.dtype(manifest.dtypes[n]).itemsize for n in store.CHUNK_ARRAYS) * row
  if store.KEY_SCALES in manifest.dtypes:
    per_row += jnp.dtype(manifest.dtypes[store.KEY_SCALES]).itemsize * model.num_kv_heads
  return len(manifest.router_layers) * manifest.num_chunks * per_row + manifest.text_bytes


def committed_length(manifest: mf.BankManifest, name: str) -> int:
  """The committed extent of `name` along its growing axis."""
  if store.grow_axis(name) == 1:
    return manifest.num_chunks
  return {"doc_chunk_offsets": manifest.num_docs + 1, "text_offsets": manifest.num_docs + 1,
          "display_ids": manifest.num_docs, "text": manifest.text_bytes}[name]


def _check_shapes(path: str, manifest: mf.BankManifest, arrays: dict) -> None:
  key_dtype = manifest.router_key_dtype
  if key_dtype not in router_keys.KEY_DTYPES or (
      router_keys.has_scale(key_dtype) != (store.KEY_SCALES in manifest.dtypes)):
    raise BankError(f"bank {path}: router keys of dtype {key_dtype} with arrays "
                    f"{sorted(manifest.dtypes)}; expected one of {router_keys.KEY_DTYPES}, with "
                    f"{store.KEY_SCALES} exactly for int8")
  for name, array in arrays.items():
    dtype = array.dtype.name
    if dtype != manifest.dtypes.get(name):
      raise BankError(f"bank {path}: array {name} has dtype {dtype}, the manifest says "
                      f"{manifest.dtypes.get(name)}")
    axis = store.grow_axis(name)
    if array.shape[axis] < committed_length(manifest, name):
      raise BankError(f"bank {path}: array {name} is truncated: {array.shape[axis]} rows, the "
                      f"manifest commits {committed_length(manifest, name)}")
  router = arrays["router_keys"]
  if router.shape[0] != len(manifest.router_layers):
    raise BankError(f"bank {path}: router_keys has {router.shape[0]} layers, the manifest lists "
                    f"router layers {list(manifest.router_layers)}")


def verify_array(path: str, manifest: mf.BankManifest, array, name: str) -> None:
  """Checks every committed segment of `name` against its manifest checksum, one at a time."""
  for _ in checked_segments(path, manifest, array, name):
    pass


def checked_segments(path: str, manifest: mf.BankManifest, array, name: str):
  """Yields (start, stop, rows) for every committed segment of `name` in order, each checked
  against its manifest checksum, and the segments against the committed length."""
  segments = manifest.checksums.get(name)
  if segments is None:
    raise BankError(f"bank {path}: the manifest has no checksums for array {name}")
  covered = 0
  for start, stop, digest in segments:
    if start != covered:
      raise BankError(f"bank {path}: checksums of {name} do not cover rows [{covered}, {start})")
    rows = store.read(path, array, name, store.axis_slice(name, start, stop))
    if mf.rows_digest(rows) != digest:
      raise BankError(f"bank {path}: array {name} is corrupt: rows [{start}, {stop}) do not match "
                      f"their checksum in the manifest")
    yield start, stop, rows
    covered = stop
  if covered != committed_length(manifest, name):
    raise BankError(f"bank {path}: checksums of {name} cover {covered} rows, the manifest "
                    f"commits {committed_length(manifest, name)}")


def _check_index(path, manifest, offsets, ids, text_offsets) -> None:
  """Invariants of the CSR offsets and display ids (beyond their checksums)."""
  if offsets[0] != 0 or offsets[-1] != manifest.num_chunks or np.any(np.diff(offsets) <= 0):
    raise BankError(f"bank {path}: doc_chunk_offsets are not increasing from 0 to "
                    f"{manifest.num_chunks}")
  if text_offsets[0] != 0 or text_offsets[-1] != manifest.text_bytes or np.any(
      np.diff(text_offsets) < 0):
    raise BankError(f"bank {path}: text_offsets are not non-decreasing from 0 to "
                    f"{manifest.text_bytes}")
  if len(np.unique(ids)) != len(ids):
    raise BankError(f"bank {path}: display ids are not unique")
