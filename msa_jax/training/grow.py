"""Growing a trained model, function-preservingly (as in Net2Net): a larger model starts exactly
where the smaller one ended, so training adds capacity without relearning what the small model knows.

Deeper (`grow_depth`): new decoder layers inserted as identities. A new layer gets fresh random
weights except its two residual write-backs, the attention's `o_proj` and the MLP's `down_proj`,
which start at zero: the layer adds nothing to the residual stream. Gradients reach the zeroed
projections at once (their inputs are not zero), and through them the rest of the new layer. New
layers are never router layers; the router layers keep their weights and move up.

Wider (`grow_width`): more hidden units, MLP units and heads (head_dim fixed). The residual stream's
new dimensions start at zero: nothing writes into them (zero embedding columns, zero `o_proj` and
`down_proj` columns), new heads and MLP units write nothing (zero `o_proj` rows, zero `down_proj`
rows), and every residual RMSNorm scale is multiplied by sqrt(old/new hidden) so that the wider mean
square of the same nonzero values normalises to the same output (exactly but for the norm's epsilon,
which now meets a mean square new/old times smaller: a relative change of about
eps * (new/old - 1) / (2 * mean square), ~1e-6 for our models' unit-scale residual stream). Weights that read the new
dimensions are random (their input is zero at first), so the new dimensions get gradients from the
first step and every new weight from the second (tested). Router heads are
duplicated (new head j copies old head j mod H on the old dimensions): the mean or max over heads of
identical cosine scores is unchanged, and the random weights on the new dimensions separate the
copies as those dimensions fill.
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


def _fresh_params(params, grown_model: cfglib.ModelConfig, grown_msa: cfglib.MSAConfig, seed: int,
                  caller: str):
  """Random per-layer params of the grown model: what the new weights are drawn from. Refuses the
  stacked params of a scanned model, whose layers `params` must name one by one."""
  if any(k.startswith("block_") for k in params):
    raise ValueError(f"{caller} takes per-layer params (layers_i); unstack scanned ones first")
  model = MSAForCausalLM(grown_model.replace(scan_layers=False), grown_msa)
  memory, prompt = dummy_batch(grown_model, grown_msa)
  return jax.jit(lambda key: nn.unbox(model.init(key, prompt, memory))["params"])(
      jax.random.key(seed))


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
  fresh = _fresh_params(params, grown_model, grown_msa, seed, "grow_depth")
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  for i in range(model_cfg.num_layers):
    out[f"layers_{_moved(i, after, count)}"] = params[f"layers_{i}"]
  for j in range(after + 1, after + 1 + count):
    layer = jax.tree.map(np.asarray, fresh[f"layers_{j}"])
    for block, proj in _ZEROED:
      layer[block][proj]["kernel"] = np.zeros_like(layer[block][proj]["kernel"])
    out[f"layers_{j}"] = layer
  return jax.tree.map(np.asarray, out), grown_model, grown_msa


def widened_config(model_cfg: cfglib.ModelConfig, *, hidden_size: int, intermediate_size: int,
                   num_heads: int) -> cfglib.ModelConfig:
  """The config of the wider model (head_dim and the GQA group size kept, so the old query heads
  keep reading the old KV heads); refuses what `grow_width` cannot grow exactly: shrinking, heads
  that are not a multiple of today's (router heads are duplicated), tied embeddings."""
  old_h, group = model_cfg.num_heads, model_cfg.num_heads // model_cfg.num_kv_heads
  if hidden_size < model_cfg.hidden_size or intermediate_size < model_cfg.intermediate_size:
    raise cfglib.ConfigError(
        f"widening cannot shrink: hidden {model_cfg.hidden_size} -> {hidden_size}, intermediate "
        f"{model_cfg.intermediate_size} -> {intermediate_size}")
  if num_heads % old_h:
    raise cfglib.ConfigError(f"num_heads {num_heads} must be a multiple of the model's {old_h} "
                             f"(new router heads copy old ones)")
  if model_cfg.tie_word_embeddings:
    raise cfglib.ConfigError("widening a model with tied embeddings is not supported: the lm head "
                             "would read the embedding's zero columns")
  return model_cfg.replace(hidden_size=hidden_size, intermediate_size=intermediate_size,
                           num_heads=num_heads, num_kv_heads=num_heads // group)


def grow_width(params, model_cfg: cfglib.ModelConfig, msa_cfg: cfglib.MSAConfig, *,
               hidden_size: int, intermediate_size: int, num_heads: int, seed: int = 0):
  """Per-layer `params` of (model_cfg, msa_cfg) -> (params, model_cfg) of the wider model (see the
  module docstring). Host arrays out; msa_cfg is unchanged."""
  wide = widened_config(model_cfg, hidden_size=hidden_size, intermediate_size=intermediate_size,
                        num_heads=num_heads)
  fresh = _fresh_params(params, wide, msa_cfg, seed, "grow_width")
  e = model_cfg.hidden_size
  h, kv = model_cfg.num_heads, model_cfg.num_kv_heads
  norm_factor = np.sqrt(e / hidden_size)

  def norm(old):
    scale = np.asarray(old["scale"]) * norm_factor
    return {"scale": np.concatenate([scale, np.full(hidden_size - e, scale.mean(), scale.dtype)])}

  def kept(new, old):  # `old` in the leading corner of a fresh random array
    out = np.array(new)
    out[tuple(slice(0, n) for n in old.shape)] = old
    return out

  def zeros_but(new, old):  # `old` in the leading corner, zeros elsewhere
    return kept(np.zeros_like(new), old)

  def heads_copied(new, old, count):  # head j reads the old dimensions as old head j % count
    out = np.array(new)
    out[:e] = np.asarray(old)[:, np.arange(out.shape[1]) % count]
    return out

  rules = {"q_proj": kept, "k_proj": kept, "v_proj": kept, "gate_proj": kept, "up_proj": kept,
           "o_proj": zeros_but, "down_proj": zeros_but,
           "router_q": lambda new, old: heads_copied(new, old, h),
           "router_k": lambda new, old: heads_copied(new, old, kv)}
  out = {"embed_tokens": {"embedding": zeros_but(fresh["embed_tokens"]["embedding"],
                                                 params["embed_tokens"]["embedding"])},
         "final_norm": norm(params["final_norm"]),
         "lm_head": kept(fresh["lm_head"], params["lm_head"])}
  unknown = set(params) - set(out) - {f"layers_{i}" for i in range(model_cfg.num_layers)}
  if unknown:
    raise ValueError(f"grow_width does not know how to widen {sorted(unknown)}")
  for i in range(model_cfg.num_layers):
    old, new = params[f"layers_{i}"], fresh[f"layers_{i}"]
    layer = {"input_norm": norm(old["input_norm"]), "post_attn_norm": norm(old["post_attn_norm"]),
             "attn": {}, "mlp": {}}
    for block in ("attn", "mlp"):
      for name, leaf in old[block].items():
        if name in ("q_norm", "k_norm"):  # over head_dim, which does not change
          layer[block][name] = jax.tree.map(np.asarray, leaf)
        elif name in rules:
          layer[block][name] = {"kernel": rules[name](new[block][name]["kernel"],
                                                      np.asarray(leaf["kernel"]))}
        else:
          raise ValueError(f"grow_width does not know how to widen layers_{i}.{block}.{name}")
    extra = set(old) - set(layer)
    if extra:
      raise ValueError(f"grow_width does not know how to widen layers_{i}.{sorted(extra)}")
    out[f"layers_{i}"] = layer
  return jax.tree.map(np.asarray, out), wide
