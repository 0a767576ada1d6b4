"""A bank's `manifest.json`: what it holds, who built it, how far encoding got, and checksums.

The manifest is the bank's commit point. Arrays are written first, then the manifest is replaced
atomically (temporary file + rename), so after a kill the bank is exactly the documents the last
manifest counts; rows past those counts are leftovers that a resumed encode overwrites.

Fingerprints say which model built the bank:
- `config_fingerprint`: sha256 of the configuration fields that change what encoding computes
  (`ENCODING_MODEL_FIELDS`, `ENCODING_MSA_FIELDS`, `ENCODING_MSA_FLAGS`); execution knobs (scan,
  remat, attention tile) and serving knobs (top-k, reductions, score mode, losses) are left out,
  so they may differ.
- `params_fingerprint`: sha256 over every parameter (name, dtype, shape, bytes, per-layer layout)
  except the LM head, the final norm and the BCE bias, which no bank array depends on.

Checksums: for every array, a list of `[start, stop, sha256]` segments along its growing axis, one
per committed batch (the bytes of those rows, C order), so verifying is streamed and appending
never rehashes old rows. The manifest carries the sha256 of its own content too
(`manifest_sha256`), so an edited or damaged manifest (say, other router layers) is refused.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import uuid
from typing import Any

import jax
import numpy as np

from msa_jax import config as cfglib
from msa_jax.memory.errors import BankError
from msa_jax.model.param_layout import unstack_layers

# 2: the manifest checksums itself; 3: router keys in bf16 or int8 (+ scales); 4: no template-head
# K/V (serving prefills the template head with every prompt, so format 3's copy was never read)
FORMAT_VERSION = 4
# What an older, convertible format holds that this one does not (`msa_jax.memory.convert`
# rewrites such a bank)
CONVERTIBLE_VERSIONS = {2: "float32 router keys and the template head's K/V",
                        3: "the template head's K/V, which serving never reads"}
MANIFEST_FILE = "manifest.json"
MANIFEST_CHECKSUM = "manifest_sha256"
ENCODING_MODEL_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                         "num_heads", "num_kv_heads", "head_dim", "rope_theta", "rms_norm_eps",
                         "tie_word_embeddings", "compute_dtype")
ENCODING_MSA_FIELDS = ("router_layers", "chunk_size", "decouple_router", "template_len")
# Encoding fields counted only when true, so banks from before the field keep their fingerprint.
ENCODING_MSA_FLAGS = ("align_doc_id",)
_UNUSED_PARAMS = ("lm_head", "final_norm", "bce_bias")


def encoding_config(model_config: cfglib.ModelConfig, msa_config: cfglib.MSAConfig) -> dict:
  """The configuration fields a bank's contents depend on, as plain JSON values."""
  model = dataclasses.asdict(model_config)
  msa = dataclasses.asdict(msa_config)
  out = {f"model.{k}": model[k] for k in ENCODING_MODEL_FIELDS}
  out.update({f"msa.{k}": list(msa[k]) if k == "router_layers" else msa[k]
              for k in ENCODING_MSA_FIELDS})
  out.update({f"msa.{k}": True for k in ENCODING_MSA_FLAGS if msa[k]})
  return out


def config_fingerprint(model_config: cfglib.ModelConfig, msa_config: cfglib.MSAConfig) -> str:
  text = json.dumps(encoding_config(model_config, msa_config), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


def params_fingerprint(params) -> str:
  """sha256 of the parameters a bank depends on; the same for the scanned and per-layer layouts."""
  tree = unstack_layers(dict(params))
  leaves = jax.tree_util.tree_flatten_with_path(
      {k: v for k, v in tree.items() if k not in _UNUSED_PARAMS})[0]
  digest = hashlib.sha256()
  for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
    arr = np.ascontiguousarray(jax.device_get(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}|{arr.dtype.name}|{arr.shape}|".encode())
    digest.update(arr.tobytes())
  return digest.hexdigest()


def rows_digest(rows: np.ndarray) -> str:
  """The checksum of a segment: sha256 of its bytes in C order."""
  return hashlib.sha256(np.ascontiguousarray(rows).tobytes()).hexdigest()


@dataclasses.dataclass
class EncodingSession:
  """An encode or append in progress (None in a finished bank). `start_doc`: the session's first
  document (0 for a fresh encode); `digest`: chain hash of its committed documents' (display id,
  text), checked when the same command resumes; the packing settings must match on resume so the
  resumed bank is byte-identical to an uninterrupted one."""

  start_doc: int
  digest: str
  row_tokens: int
  batch_rows: int
  max_docs_per_row: int


@dataclasses.dataclass
class BankManifest:
  format_version: int
  config_fingerprint: str
  params_fingerprint: str
  model_config: dict
  msa_config: dict
  chunk_size: int
  router_layers: tuple[int, ...]
  num_docs: int
  num_chunks: int
  text_bytes: int
  dtypes: dict[str, str]
  score_mode: str
  rows_per_chunk: int
  checksums: dict[str, list[list]]
  encoding: EncodingSession | None
  created: str
  updated: str

  @property
  def fingerprint(self) -> str:
    """One string naming the model that built the bank (config and parameters)."""
    return f"config:{self.config_fingerprint[:16]}/params:{self.params_fingerprint[:16]}"

  @property
  def complete(self) -> bool:
    return self.encoding is None

  def configs(self) -> tuple[cfglib.ModelConfig, cfglib.MSAConfig]:
    return cfglib.config_from_dict({"model": self.model_config, "msa": self.msa_config})

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["router_layers"] = list(self.router_layers)
    return out

  @property
  def router_key_dtype(self) -> str:
    return self.dtypes["router_keys"]

  @classmethod
  def from_json(cls, obj: Any, where: str,
                versions: tuple[int, ...] = (FORMAT_VERSION,)) -> "BankManifest":
    if not isinstance(obj, dict):
      raise BankError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    version = obj.get("format_version")
    if version not in versions:
      how = "re-encode the corpus"
      if version in CONVERTIBLE_VERSIONS:
        how = (f"it holds {CONVERTIBLE_VERSIONS[version]}; convert it with `python "
               f"tools/convert_bank.py --bank={os.path.dirname(where)} --out=<new bank>`, or {how}")
      raise BankError(f"{where}: bank format version {version!r}, but this msa_jax reads version "
                      f"{FORMAT_VERSION}; {how}")
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in obj]
    if missing:
      raise BankError(f"{where}: manifest lacks {', '.join(missing)}")
    values = {n: obj[n] for n in names}
    try:
      values["router_layers"] = tuple(int(i) for i in values["router_layers"])
      if values["encoding"] is not None:
        values["encoding"] = EncodingSession(**values["encoding"])
      for n in ("num_docs", "num_chunks", "text_bytes", "chunk_size", "rows_per_chunk"):
        if not isinstance(values[n], int) or values[n] < 0:
          raise BankError(f"{where}: {n} must be a non-negative integer, got {values[n]!r}")
    except (TypeError, ValueError) as e:
      if isinstance(e, BankError):
        raise
      raise BankError(f"{where}: malformed manifest ({e})") from None
    manifest = cls(**values)
    try:
      manifest.configs()
    except cfglib.ConfigError as e:
      raise BankError(f"{where}: the manifest's model configuration is invalid ({e})") from None
    return manifest


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def manifest_path(bank_dir: str) -> str:
  return os.path.join(bank_dir, MANIFEST_FILE)


def read_manifest(bank_dir: str, versions: tuple[int, ...] = (FORMAT_VERSION,)) -> BankManifest:
  """The bank's manifest, checked against its own checksum; other format versions than
  `versions` are refused (saying how to convert or re-encode)."""
  path = manifest_path(bank_dir)
  if not os.path.lexists(bank_dir):
    raise BankError(f"no bank at {bank_dir}: it does not exist")
  if not os.path.isdir(bank_dir):
    raise BankError(f"no bank at {bank_dir}: it is a file, not a bank directory")
  if not os.path.exists(path):
    raise BankError(f"{bank_dir} is not a bank: it has no {MANIFEST_FILE}")
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BankError(f"{path}: corrupt manifest, not valid JSON ({e})") from None
  if isinstance(obj, dict) and obj.get("format_version") in versions:
    if obj.pop(MANIFEST_CHECKSUM, None) != content_digest(obj):
      raise BankError(f"{path}: the manifest does not match its checksum: it was edited or "
                      f"damaged after it was written (a bank's manifest must not be edited; "
                      f"encode the corpus again)")
  return BankManifest.from_json(obj, path, versions)


def content_digest(obj: dict) -> str:
  """The manifest's checksum of its own content (every key but the checksum)."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def write_manifest(bank_dir: str, manifest: BankManifest) -> None:
  """Replaces the manifest atomically: a reader sees the old commit or the new one, never a mix."""
  path = manifest_path(bank_dir)
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    obj = manifest.to_json()
    obj[MANIFEST_CHECKSUM] = content_digest(obj)
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=1)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def config_mismatch(manifest: BankManifest, model_config: cfglib.ModelConfig,
                    msa_config: cfglib.MSAConfig) -> list[str]:
  """The encoding-relevant fields on which the bank and the given configs differ, as text."""
  stored_model, stored_msa = manifest.configs()
  ours = encoding_config(stored_model, stored_msa)
  theirs = encoding_config(model_config, msa_config)
  return [f"{k}: bank {ours.get(k, False)!r}, given {theirs.get(k, False)!r}"
          for k in {**ours, **theirs} if ours.get(k) != theirs.get(k)]
