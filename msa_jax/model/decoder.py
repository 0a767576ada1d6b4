"""The Qwen3 decoder: embedding, a stack of pre-norm decoder layers, final norm and LM head.

Layers are grouped into *blocks*: maximal runs of consecutive layers of the same kind (router layer or
not). With `scan_layers` each block is one `nn.scan` with stacked parameters (`block_{a}_{b}` holds
layers a..b-1 along a leading `layers` axis); otherwise each layer is its own module `layers_{i}`.
`msa_jax.model.param_layout` converts between the two parameter layouts, so a checkpoint written in one
loads into the other.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from msa_jax.config import ModelConfig
from msa_jax.model.attention import Attention, causal_segment_mask
from msa_jax.model.layers import RMSNorm, dtype_of
from msa_jax.model.mlp import MLP

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute everything
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def layer_blocks(num_layers: int, router_layers) -> list[tuple[int, int, bool]]:
  """Maximal runs [start, end) of consecutive layers of the same kind: (start, end, is_router)."""
  router = set(router_layers)
  blocks = []
  for i in range(num_layers):
    kind = i in router
    if blocks and blocks[-1][2] == kind:
      blocks[-1] = (blocks[-1][0], i + 1, kind)
    else:
      blocks.append((i, i + 1, kind))
  return blocks


class DecoderLayer(nn.Module):
  """Pre-norm Qwen3 layer. Signature `(x, positions, mask) -> (x, None)` so it can be scanned."""

  config: ModelConfig
  is_router_layer: bool = False

  @nn.compact
  def __call__(self, x, positions, mask):
    c = self.config
    h = RMSNorm(c.rms_norm_eps, c.param_dtype, name="input_norm")(x)
    x = x + Attention(c, self.is_router_layer, name="attn")(h, positions, mask)
    h = RMSNorm(c.rms_norm_eps, c.param_dtype, name="post_attn_norm")(x)
    x = x + MLP(c, name="mlp")(h)
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), None


def _layer_class(config: ModelConfig):
  if config.remat_policy == "none":
    return DecoderLayer
  return nn.remat(DecoderLayer, policy=_REMAT_POLICIES[config.remat_policy],
                  prevent_cse=not config.scan_layers)


class Qwen3Decoder(nn.Module):
  """Token ids -> logits (or final hidden states).

  `positions` default to 0..S-1; `segment_ids` (0 = padding) default to all ones. Attention is causal
  within equal segment ids.
  """

  config: ModelConfig
  router_layers: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, return_hidden: bool = False):
    c = self.config
    b, s = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    if segment_ids is None:
      segment_ids = jnp.ones((b, s), jnp.int32)
    mask = causal_segment_mask(segment_ids)
    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=dtype_of(c.compute_dtype),
                     param_dtype=dtype_of(c.param_dtype),
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(c.initializer_range), ("vocab", "embed")),
                     name="embed_tokens")
    x = nn.with_logical_constraint(embed(tokens), ("batch", "length", "act_embed"))
    layer_cls = _layer_class(c)
    for start, end, is_router in layer_blocks(c.num_layers, self.router_layers):
      if c.scan_layers:
        scanned = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(nn.broadcast, nn.broadcast), length=end - start,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = scanned(c, is_router, name=f"block_{start}_{end}")(x, positions, mask)
      else:
        for i in range(start, end):
          x, _ = layer_cls(c, is_router, name=f"layers_{i}")(x, positions, mask)
    x = RMSNorm(c.rms_norm_eps, c.param_dtype, name="final_norm")(x)
    if return_hidden:
      return x
    if c.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      kernel = self.param("lm_head", nn.with_logical_partitioning(
          nn.initializers.normal(c.initializer_range), ("embed", "vocab")),
          (c.hidden_size, c.vocab_size), dtype_of(c.param_dtype))
      logits = jnp.dot(x.astype(c.compute_dtype), kernel.astype(c.compute_dtype))
    return nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
