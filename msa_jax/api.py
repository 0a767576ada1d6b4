"""The library entry point: load a converted msa_jax checkpoint (or a Hugging Face directory) and run it.

    import msa_jax
    model = msa_jax.load("/ckpt/tiny")
    logits = model.logits([[1, 2, 3]])           # [1, 3, vocab]
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from msa_jax import config as cfglib
from msa_jax.checkpoint import convert
from msa_jax.checkpoint.errors import CheckpointError
from msa_jax.data.tokenizer import Tokenizer
from msa_jax.data.batch import plain_prompt
from msa_jax.model.model import MSAForCausalLM
from msa_jax.model.param_layout import to_model_layout, unstack_layers


@dataclasses.dataclass
class LoadedModel:
  """A model definition, its parameters (in the model's layout) and, when present, its tokenizer."""

  model_config: cfglib.ModelConfig
  msa_config: cfglib.MSAConfig
  params: Any
  tokenizer: Tokenizer | None = None

  @property
  def model(self) -> MSAForCausalLM:
    return MSAForCausalLM(self.model_config, self.msa_config)

  def with_top_k_docs(self, top_k_docs: int) -> "LoadedModel":
    """This model serving `top_k_docs` documents per router layer (a serving choice, as the
    official engine's top-k is)."""
    if isinstance(top_k_docs, bool) or not isinstance(top_k_docs, int) or top_k_docs < 1:
      raise ValueError(f"top_k_docs must be a positive int, got {top_k_docs!r}")
    return dataclasses.replace(self, msa_config=self.msa_config.replace(top_k_docs=top_k_docs))

  def logits(self, tokens, positions=None, segment_ids=None) -> jax.Array:
    """Logits [B, S, V] of token ids [B, S] without memory (the Qwen3 backbone); `positions`
    default to 0..S-1, `segment_ids` (1 = token, 0 = padding) to all ones."""
    return _plain_logits(self.model, self.params, plain_prompt(tokens, positions, segment_ids))


@functools.partial(jax.jit, static_argnums=0)
def _plain_logits(model, params, prompt):
  return model.apply({"params": params}, prompt, method=MSAForCausalLM.prompt_logits)[0]


def load(path: str, *, compute_dtype: str | None = None, param_dtype: str | None = None,
         scan_layers: bool | None = None, score_mode: str | None = None,
         top_k_docs: int | None = None, shardings: Any = None) -> LoadedModel:
  """Loads an msa_jax checkpoint directory, or converts a Hugging Face directory in memory.

  Overrides: `compute_dtype` (e.g. "float32" for parity checks), `param_dtype` (cast on load),
  `scan_layers`, `score_mode` (replacing the router score gating read from the checkpoint) and
  `top_k_docs` (the documents each router layer selects: a serving choice, as the official
  engine's top-k is; the shipped tiny model writes ids exactly from one selected document but not
  from several, BENCHMARKS §18).
  `shardings`: NamedShardings in the model's layout (e.g. `sharding.param_shardings`); each
  parameter of an msa_jax checkpoint is then read straight onto its devices, so no host holds the
  whole model (a Hugging Face directory still passes through host memory once).
  """
  if os.path.exists(os.path.join(path, convert.CONFIG_FILE)):
    _, model_cfg, msa_cfg = convert.read_meta(path)
  elif os.path.exists(os.path.join(path, "config.json")):
    model_cfg, msa_cfg, params, _, _ = convert.read_hf_params(path, param_dtype=param_dtype)
  else:
    raise CheckpointError(f"{path} is neither an msa_jax checkpoint ({convert.CONFIG_FILE}) nor a "
                          f"Hugging Face directory (config.json)")
  overrides = {k: v for k, v in dict(compute_dtype=compute_dtype, param_dtype=param_dtype,
                                     scan_layers=scan_layers).items() if v is not None}
  model_cfg = model_cfg.replace(**overrides)
  if score_mode is not None:
    msa_cfg = msa_cfg.replace(score_mode=score_mode)
  dtype = jnp.dtype(model_cfg.param_dtype)
  target = None
  if os.path.exists(os.path.join(path, convert.CONFIG_FILE)):
    target = None if shardings is None else _sharded_target(path, shardings, model_cfg.num_layers)
    params = convert.restore_tree(path, target)["params"]
  if shardings is None:
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), dtype), params)
    params = to_model_layout(params, model_cfg, msa_cfg.router_layers)
  elif target is None:  # host arrays (a Hugging Face directory): each leaf sent to its devices
    params = jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)
    params = jax.device_put(to_model_layout(params, model_cfg, msa_cfg.router_layers), shardings)
  else:  # already on the devices: cast and stack (scan_layers) there
    params = jax.jit(lambda p: to_model_layout(jax.tree.map(lambda x: x.astype(dtype), p),
                                               model_cfg, msa_cfg.router_layers),
                     out_shardings=shardings)(params)
  tok_path = os.path.join(path, convert.TOKENIZER_FILE)
  tokenizer = Tokenizer.from_file(tok_path) if os.path.exists(tok_path) else None
  loaded = LoadedModel(model_cfg, msa_cfg, params, tokenizer)
  return loaded if top_k_docs is None else loaded.with_top_k_docs(top_k_docs)


def _sharded_target(path: str, shardings, num_layers: int):
  """The restore target of a checkpoint (stored per layer) for model-layout `shardings`: a scanned
  block's sharding, less its leading layer axis, serves each of its layers; extras are replicated."""
  def per_layer(s):
    return [NamedSharding(s.mesh, PartitionSpec(*s.spec[1:]))] * num_layers

  stored = unstack_layers({k: jax.tree.map(per_layer, v) if k.startswith("block_") else v
                           for k, v in shardings.items()})
  abstract = convert.abstract_tree(path)
  replicated = NamedSharding(jax.tree.leaves(shardings)[0].mesh, PartitionSpec())
  with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  target = {k: jax.tree.map(lambda a: with_sharding(a, replicated), v)
            for k, v in abstract.items() if k != "params"}
  target["params"] = jax.tree.map(with_sharding, abstract["params"], stored)
  return target
