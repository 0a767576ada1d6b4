"""Deepening a trained model: new decoder layers inserted as identities, so that a larger model
starts exactly where the smaller one ended and training adds capacity without relearning what the
small model knows (function-preserving growth, as in Net2Net's deeper networks).

A new layer gets fresh random weights except its two residual write-backs, the attention's
`o_proj` and the MLP's `down_proj`, which start at zero: the layer adds nothing to the residual
stream, so the grown model computes the same logits and router scores as the original. Gradients
reach the zeroed projections at once (their inputs are not zero), and through them the rest of the
new layer. New layers are never router layers; the router layers keep their weights and move up.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from msa_jax import config as cfglib
from msa_jax.model.model import MSAForCausalLM
from msa_jax.training.model_setup import dummy_batch

_ZEROED = (("attn", "o_proj"), ("mlp", "down_proj"))


def _moved(index: int, after: int, count: int) -> int:
  return index if index <= after else index + count


def grown_configs(model_cfg: cfglib.ModelConfig, msa_cfg: cfglib.MSAConfig, *, after: int,
                  count: int):
  """The configs of a model with `count` layers inserted after layer `after` (-1: before the
  first). The router layers (and `aux_loss_min_layer`, which selects router layers by index) move
  with the layers they name."""
  if not -1 <= after < model_cfg.num_layers:
    raise cfglib.ConfigError(f"after must name a layer in [-1, {model_cfg.num_layers - 1}] "
                             f"(-1 inserts before the first), got {after}")
  if count < 1:
    raise cfglib.ConfigError(f"the number of new layers must be at least 1, got {count}")
  grown_model = model_cfg.replace(num_layers=model_cfg.num_layers + count)
  min_layer = msa_cfg.aux_loss_min_layer
  grown_msa = msa_cfg.replace(
      router_layers=tuple(_moved(i, after, count) for i in msa_cfg.router_layers),
      aux_loss_min_layer=min_layer if min_layer <= after else min_layer + count)
  return grown_model, grown_msa.validate_for(grown_model)


def grow_depth(params, model_cfg: cfglib.ModelConfig, msa_cfg: cfglib.MSAConfig, *, after: int,
               count: int, seed: int = 0):
  """Per-layer `params` of (model_cfg, msa_cfg) -> (params, model_cfg, msa_cfg) of the model with
  `count` identity layers inserted after layer `after` (see the module docstring). Host arrays out."""
  grown_model, grown_msa = grown_configs(model_cfg, msa_cfg, after=after, count=count)
  if any(k.startswith("block_") for k in params):
    raise ValueError("grow_depth takes per-layer params (layers_i); unstack scanned ones first")
  model = MSAForCausalLM(grown_model.replace(scan_layers=False), grown_msa)
  memory, prompt = dummy_batch(grown_model, grown_msa)
  fresh = jax.jit(lambda key: nn.unbox(model.init(key, prompt, memory))["params"])(
      jax.random.key(seed))
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  for i in range(model_cfg.num_layers):
    out[f"layers_{_moved(i, after, count)}"] = params[f"layers_{i}"]
  for j in range(after + 1, after + 1 + count):
    layer = jax.tree.map(np.asarray, fresh[f"layers_{j}"])
    for block, proj in _ZEROED:
      layer[block][proj]["kernel"] = np.zeros_like(layer[block][proj]["kernel"])
    out[f"layers_{j}"] = layer
  return jax.tree.map(np.asarray, out), grown_model, grown_msa
