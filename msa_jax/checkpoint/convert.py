"""Hugging Face directory <-> msa_jax checkpoint directory.

An msa_jax checkpoint directory holds:
  msa_jax_config.json  our ModelConfig + MSAConfig, the source HF config.json and its model_type,
                       the size and sha256 of every file under params/ (checked before a restore)
  params/              an orbax checkpoint of {"params": per-layer tree, "extras": HF loss scalars}
  tokenizer.json       (and the other tokenizer / generation files of the source, copied)

Conversion streams tensor by tensor: the source is memory-mapped, each tensor is validated, transposed
and kept once, so a 4B model never exists twice in host memory. Everything is written into a temporary
directory renamed into place at the end, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from msa_jax import config as cfglib
from msa_jax.atomic_dir import atomic_output_dir
from msa_jax.checkpoint.digest import files_digest, verify_files
from msa_jax.checkpoint.errors import CheckpointError, restore_error
from msa_jax.checkpoint.hf_names import (LOSS_SCALARS, get_path, is_router_spec, set_path,
                                         tensor_specs)
from msa_jax.checkpoint.safetensors_dir import SafetensorsDir, write_safetensors_dir
from msa_jax.model.layers import dtype_of

CONFIG_FILE = "msa_jax_config.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1
PARAMS_FILES = "params_files"  # msa_jax_config.json: {file under params/: [size, sha256]}
TOKENIZER_FILE = "tokenizer.json"
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "vocab.json", "merges.txt")


def _load_json_object(path: str, what: str = "") -> dict[str, Any]:
  try:
    obj = cfglib.load_config_json(path)
  except cfglib.ConfigError as e:
    raise CheckpointError(f"{what}{e}") from e
  except UnicodeDecodeError as e:  # binary garbage: not even text
    raise CheckpointError(f"{what}corrupt JSON in {path}: not UTF-8 text ({e})") from e
  if not isinstance(obj, dict):
    raise CheckpointError(f"{what}{path} must hold a JSON object, got {type(obj).__name__}")
  return obj


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  return _load_json_object(os.path.join(hf_dir, "config.json"))


def _check_output(out_dir: str, overwrite: bool) -> None:
  """Fails before any work when the output exists and may not be replaced."""
  if os.path.lexists(out_dir) and not overwrite:
    raise CheckpointError(f"output {os.path.abspath(out_dir)} already exists (pass overwrite=True / "
                          f"--overwrite to replace it)")


def _check_names(source: SafetensorsDir, specs, allow_missing_router: bool):
  """Every problem of the source's tensor names and shapes, in one error."""
  present = set(source.names())
  expected = {s.hf_name: s for s in specs}
  problems = []
  missing = sorted(n for n, s in expected.items()
                   if n not in present and not (allow_missing_router and is_router_spec(s)))
  if missing:
    problems.append(f"missing tensors ({len(missing)}): {missing}")
  tolerated = set(LOSS_SCALARS) | {"lm_head.weight"}  # lm_head may be saved even when tied
  unexpected = sorted(present - set(expected) - tolerated)
  if unexpected:
    problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected}")
  for name in sorted(present & set(expected)):
    got, want = source.shape(name), expected[name].hf_shape
    if got != want:
      problems.append(f"tensor {name} has shape {list(got)}, expected {list(want)}")
  if problems:
    raise CheckpointError(f"{source.path}: " + "; ".join(problems))


def _check_finite(where: str, name: str, value: np.ndarray, allow_nonfinite: bool) -> None:
  """A NaN or inf weight is a broken checkpoint, refused unless the caller allows it."""
  if not allow_nonfinite and value.size and not np.isfinite(value).all():
    bad = int(value.size - np.count_nonzero(np.isfinite(value)))
    raise CheckpointError(f"{where}: tensor {name} holds {bad} non-finite values (NaN or inf); "
                          f"pass allow_nonfinite=True (--allow_nonfinite) to convert it anyway")


def read_hf_params(hf_dir: str, *, score_mode: str | None = None, param_dtype: str | None = None,
                   seed: int = 0, allow_nonfinite: bool = False):
  """Reads an HF directory into (ModelConfig, MSAConfig, per-layer params, extras, hf_config).

  A plain Qwen3 gets router projections drawn from N(0, initializer_range) (how an MSA model is made
  from a base Qwen3); an MSA checkpoint must carry them. Non-finite weights are refused unless
  `allow_nonfinite`.
  """
  hf_config = read_hf_config(hf_dir)
  try:
    model_cfg, msa_cfg = cfglib.from_hf_config(hf_config, score_mode=score_mode,
                                               param_dtype=param_dtype)
  except cfglib.ConfigError as e:
    raise CheckpointError(f"{hf_dir}/config.json: {e}") from e
  is_msa = hf_config["model_type"] == "msa"
  specs = tensor_specs(model_cfg, msa_cfg.router_layers if msa_cfg.decouple_router else ())
  dtype = dtype_of(model_cfg.param_dtype)
  rng = np.random.default_rng(seed)
  params: dict[str, Any] = {}
  extras: dict[str, np.ndarray] = {}
  with SafetensorsDir(hf_dir) as source:
    _check_names(source, specs, allow_missing_router=not is_msa)
    present = set(source.names())
    for spec in specs:
      if spec.hf_name in present:
        value = spec.to_ours(source.get(spec.hf_name))
        _check_finite(hf_dir, spec.hf_name, value, allow_nonfinite)
      else:  # router projection of a base Qwen3
        value = rng.normal(0.0, model_cfg.initializer_range, spec.shape)
      set_path(params, spec.path, value.astype(dtype, copy=False))
    for name in LOSS_SCALARS:
      if name in present:
        extras[name] = source.get(name)
  return model_cfg, msa_cfg, params, extras, hf_config


def _save_tree(path: str, params, extras) -> None:
  tree = {"params": params}
  if extras:
    tree["extras"] = extras
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, tree)
  checkpointer.wait_until_finished()


def hf_to_msa_jax(hf_dir: str, out_dir: str, *, score_mode: str | None = None,
                  param_dtype: str | None = None, seed: int = 0, overwrite: bool = False,
                  require_tokenizer: bool = True, allow_nonfinite: bool = False) -> str:
  """Converts an HF Qwen3 / MSA directory into an msa_jax checkpoint directory; returns its path."""
  if not os.path.isdir(hf_dir):
    raise CheckpointError(f"input directory does not exist: {hf_dir}")
  _check_output(out_dir, overwrite)
  if require_tokenizer and not os.path.exists(os.path.join(hf_dir, TOKENIZER_FILE)):
    raise CheckpointError(f"{hf_dir} has no {TOKENIZER_FILE} (convert weights only with "
                          f"require_tokenizer=False / --norequire_tokenizer)")
  model_cfg, msa_cfg, params, extras, hf_config = read_hf_params(
      hf_dir, score_mode=score_mode, param_dtype=param_dtype, seed=seed,
      allow_nonfinite=allow_nonfinite)
  side_files = [os.path.join(hf_dir, name) for name in SIDE_FILES]
  return write_checkpoint_dir(out_dir, model_cfg, msa_cfg, params, extras=extras,
                              hf_config=hf_config, side_files=side_files, overwrite=overwrite)


def write_checkpoint_dir(out_dir: str, model_cfg: cfglib.ModelConfig, msa_cfg: cfglib.MSAConfig,
                         params, *, extras=None, hf_config=None, side_files=(),
                         overwrite: bool = False, extra_meta=None) -> str:
  """Writes an msa_jax checkpoint directory (atomically) from per-layer params (host or device
  arrays). `side_files` that exist (tokenizer files) are copied in; `hf_config` defaults to the
  MSA config transformers would read; `extra_meta` adds keys to msa_jax_config.json."""
  _check_output(out_dir, overwrite)
  extras = dict(extras or {})
  hf_config = hf_config or cfglib.to_hf_config(model_cfg, msa_cfg)
  with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
    _save_tree(os.path.join(tmp, PARAMS_DIR), params, extras)
    meta = {"format_version": FORMAT_VERSION, **cfglib.config_to_dict(model_cfg, msa_cfg),
            "hf_model_type": hf_config["model_type"], "hf_config": hf_config,
            "extras": sorted(extras), **(extra_meta or {}),
            PARAMS_FILES: files_digest(os.path.join(tmp, PARAMS_DIR))}
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(meta, f, indent=2)
    for path in side_files:
      if os.path.exists(path):
        shutil.copy(path, os.path.join(tmp, os.path.basename(path)))
  return os.path.abspath(out_dir)


def read_meta(ckpt_dir: str):
  """Reads and validates msa_jax_config.json: (the JSON dict, ModelConfig, MSAConfig)."""
  if not os.path.isdir(ckpt_dir):
    raise CheckpointError(f"msa_jax checkpoint directory does not exist: {ckpt_dir}")
  path = os.path.join(ckpt_dir, CONFIG_FILE)
  meta = _load_json_object(path, what=f"{ckpt_dir} is not an msa_jax checkpoint: ")
  if meta.get("format_version") != FORMAT_VERSION:
    raise CheckpointError(f"{path}: unsupported format_version {meta.get('format_version')!r} "
                          f"(this msa_jax reads {FORMAT_VERSION})")
  try:
    model_cfg, msa_cfg = cfglib.config_from_dict(meta)
  except cfglib.ConfigError as e:
    raise CheckpointError(f"{path}: {e}") from e
  return meta, model_cfg, msa_cfg


def restore_tree(ckpt_dir: str, target=None):
  """Restores the orbax tree ({"params", maybe "extras"}); `target` may carry shardings. The
  files are first checked against the checksums msa_jax_config.json records (a checkpoint written
  before they were recorded is restored unchecked)."""
  path = os.path.join(os.path.abspath(ckpt_dir), PARAMS_DIR)
  if not os.path.isdir(path):
    raise CheckpointError(f"{ckpt_dir} has no {PARAMS_DIR}/ directory")
  config = os.path.join(ckpt_dir, CONFIG_FILE)
  if os.path.exists(config):
    verify_files(path, _load_json_object(config).get(PARAMS_FILES, {}))
  try:
    with ocp.StandardCheckpointer() as checkpointer:  # (closed even on failure)
      return checkpointer.restore(path, target)
  except Exception as e:  # orbax raises many types for damaged checkpoints
    raise restore_error(path, e) from e


def abstract_tree(ckpt_dir: str):
  """The stored tree as `jax.ShapeDtypeStruct`s, from orbax's metadata (no array is read): the
  skeleton of a sharded `restore_tree` target."""
  path = os.path.join(os.path.abspath(ckpt_dir), PARAMS_DIR)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      meta = checkpointer.metadata(path)
  except Exception as e:  # orbax raises many types for damaged checkpoints
    raise restore_error(path, e) from e
  tree = getattr(meta, "item_metadata", meta)
  return {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), v)
          for k, v in tree.items()}


def _check_tree(ckpt_dir: str, params, specs) -> None:
  """Every parameter the config implies is in the restored tree, with its shape; else one error."""
  missing, wrong = [], []
  for spec in specs:
    name = "/".join(spec.path)
    try:
      leaf = get_path(params, spec.path)
    except (KeyError, TypeError, IndexError):
      missing.append(name)
      continue
    if tuple(np.shape(leaf)) != spec.shape:
      wrong.append(f"{name} has shape {list(np.shape(leaf))}, expected {list(spec.shape)}")
  problems = ([f"missing parameters ({len(missing)}): {missing}"] if missing else []) + wrong
  if problems:
    raise CheckpointError(f"{os.path.join(ckpt_dir, PARAMS_DIR)} does not match {CONFIG_FILE}: "
                          + "; ".join(problems))


def msa_jax_to_hf(ckpt_dir: str, out_dir: str, *, hf_format: str = "auto", overwrite: bool = False,
                  max_shard_bytes: int = 2 << 30, allow_nonfinite: bool = False) -> str:
  """Writes an msa_jax checkpoint as an HF safetensors directory that transformers loads.

  `hf_format`: "qwen3" (plain Qwen3, router projections dropped), "msa" (official MSA layout with
  `msa_config` and router weights), or "auto" (the format the checkpoint was converted from).
  """
  if hf_format not in ("auto", "qwen3", "msa"):
    raise CheckpointError(f"hf_format must be auto, qwen3 or msa, got {hf_format!r}")
  meta, model_cfg, msa_cfg = read_meta(ckpt_dir)
  _check_output(out_dir, overwrite)
  fmt = meta.get("hf_model_type", "msa") if hf_format == "auto" else hf_format
  if fmt not in ("qwen3", "msa"):
    raise CheckpointError(f"{os.path.join(ckpt_dir, CONFIG_FILE)}: unknown hf_model_type {fmt!r}")
  tree = restore_tree(ckpt_dir)
  params = tree.get("params") if isinstance(tree, dict) else None
  if not isinstance(params, dict):
    raise CheckpointError(f"{os.path.join(ckpt_dir, PARAMS_DIR)} holds no 'params' tree")
  routers = msa_cfg.router_layers if (fmt == "msa" and msa_cfg.decouple_router) else ()
  specs = tensor_specs(model_cfg, routers)
  _check_tree(ckpt_dir, params, specs)

  def tensors():
    for spec in specs:
      value = np.asarray(get_path(params, spec.path))
      _check_finite(ckpt_dir, "/".join(spec.path), value, allow_nonfinite)
      yield spec.hf_name, spec.to_hf(value)
    if fmt == "msa":
      for name, value in tree.get("extras", {}).items():
        yield name, np.asarray(value)

  hf_config = cfglib.to_hf_config(model_cfg, msa_cfg if fmt == "msa" else None,
                                  base=meta.get("hf_config"))
  with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
    write_safetensors_dir(tmp, tensors(), max_shard_bytes=max_shard_bytes)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    for name in SIDE_FILES:
      if os.path.exists(os.path.join(ckpt_dir, name)):
        shutil.copy(os.path.join(ckpt_dir, name), os.path.join(tmp, name))
  return os.path.abspath(out_dir)
