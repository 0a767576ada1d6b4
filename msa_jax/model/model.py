"""`MSAForCausalLM`: the Qwen3 decoder with Memory Sparse Attention over two streams.

Layers are grouped into *blocks*: maximal runs of consecutive layers of the same kind (router layer or
not). With `scan_layers` each block is one `nn.scan` with stacked parameters (`block_{a}_{b}` holds
layers a..b-1 along a leading `layers` axis); otherwise each layer is its own module `layers_{i}`.
`msa_jax.model.param_layout` converts between the two parameter layouts.

The module returns prompt hidden states and per-router-layer routing; `logits` and `lm_kernel` give
the LM head, which losses apply chunk by chunk (no [B, S, V] float32 tensor). The three callers
(training forward, `encode_memory`, `prefill`) are in `msa_jax.model.entry_points`.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from msa_jax.config import ModelConfig, MSAConfig
from msa_jax.model.layer import MSADecoderLayer
from msa_jax.model.layers import RMSNorm, dtype_of
from msa_jax.model.memory_view import MemoryView

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


@flax.struct.dataclass
class MSAOutput:
  """hidden [B,S_q,E] (final-normed prompt states, None in encode); memory_hidden [B,S_mem,E]
  (final-normed memory-stream states, None without a memory stream: training's memory LM loss
  reads them, anything else leaves them to dead-code elimination); per router layer, stacked in
  `router_layers` order: doc_scores [L_r,B,C] f32, doc_selected [L_r,B,C] bool; doc_present [B,C]
  (column d-1 = document d; C = chunk slots, an upper bound on documents per row). `extras` holds
  collected outputs: "pooled" (a MemoryView), "prompt_kv" and "kv" (lists per layer, see
  `MSADecoderLayer`), "selection" (list per router layer) and, when decoding, "cache"."""

  hidden: jax.Array | None
  memory_hidden: jax.Array | None
  doc_scores: jax.Array | None
  doc_selected: jax.Array | None
  doc_present: jax.Array | None
  extras: dict


class MSAForCausalLM(nn.Module):
  config: ModelConfig
  msa: MSAConfig
  attention_impl: str = "auto"  # segment_attention.api: by backend, blockwise on CPU
  collect: tuple[str, ...] = ()

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(
        c.vocab_size, c.hidden_size, dtype=dtype_of(c.compute_dtype),
        param_dtype=dtype_of(c.param_dtype),
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(c.initializer_range if c.embedding_init_std is None
                                   else c.embedding_init_std), ("vocab", "embed")))
    layer_cls = MSADecoderLayer
    if c.remat_policy != "none":
      layer_cls = nn.remat(MSADecoderLayer, policy=_REMAT_POLICIES[c.remat_policy],
                           prevent_cse=not c.scan_layers)
    kwargs = dict(attention_impl=self.attention_impl, collect=self.collect)
    blocks = layer_blocks(c.num_layers, self.msa.router_layers)
    if c.scan_layers:  # attribute-container names: block_{a}_{b}
      self.block = {f"{a}_{b}": nn.scan(
          layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, 0), length=b - a,
          metadata_params={nn.PARTITION_NAME: "layers"})(c, self.msa, is_router, **kwargs)
                    for a, b, is_router in blocks}
    else:  # layers_{i}
      router = set(self.msa.router_layers)
      self.layers = [layer_cls(c, self.msa, i in router, **kwargs) for i in range(c.num_layers)]
    self.final_norm = RMSNorm(c.rms_norm_eps, c.param_dtype)
    if self.msa.aux_loss_method == "BCE":  # the BCE aux loss's learnable bias (official `b`)
      self.bce_bias = self.param("bce_bias", nn.with_logical_partitioning(
          nn.initializers.constant(self.msa.bce_bias_init), ()), (), jnp.float32)
    if not c.tie_word_embeddings:
      self.lm_head = self.param("lm_head", nn.with_logical_partitioning(
          nn.initializers.normal(c.initializer_range), ("embed", "vocab")),
          (c.hidden_size, c.vocab_size), dtype_of(c.param_dtype))

  def _embed(self, tokens):
    return nn.with_logical_constraint(self.embed_tokens(tokens), ("batch", "length", "act_embed"))

  def __call__(self, prompt=None, memory=None, view: MemoryView | None = None,
               cache=None) -> MSAOutput:
    """Runs whichever streams are given. `view` (prefill) replaces the memory stream as the router
    layers' memory; without both, router layers give the prompt no memory. `cache` (decode: one
    layer cache per layer, see `msa_jax.inference.kv_cache`) appends the prompt's tokens to what
    earlier calls attended; the updated caches are in `extras["cache"]`."""
    c = self.config
    streams = (None if memory is None else self._embed(memory.tokens),
               None if prompt is None else self._embed(prompt.tokens))
    per_layer = {}
    if cache is not None:
      if c.scan_layers or memory is not None or view is not None or prompt is None:
        raise ValueError("decoding with a cache takes a prompt only, in the per-layer layout "
                         "(scan_layers=False)")
      for i in range(c.num_layers):
        streams, per_layer[i] = self.layers[i](streams, None, prompt, None, cache[i])
      return self._collect_outputs(streams, per_layer)
    for start, end, is_router in layer_blocks(c.num_layers, self.msa.router_layers):
      if c.scan_layers:
        xs = view.span(start, end) if (view is not None and is_router) else None
        streams, ys = self.block[f"{start}_{end}"](streams, memory, prompt, xs)
        for i in range(start, end):
          per_layer[i] = jax.tree.map(lambda y, j=i - start: y[j], ys)
      else:
        for i in range(start, end):
          layer_memory = view.at(i) if (view is not None and is_router) else None
          streams, per_layer[i] = self.layers[i](streams, memory, prompt, layer_memory)
    return self._collect_outputs(streams, per_layer)

  def _collect_outputs(self, streams, per_layer) -> MSAOutput:
    routers = self.msa.router_layers
    memory_hidden, hidden = (None if x is None else self.final_norm(x) for x in streams)
    selections = [per_layer[i]["selection"] for i in routers if "selection" in per_layer[i]]
    scores = selected = present = None
    if selections:
      scores = jnp.stack([s.doc_scores for s in selections])
      selected = jnp.stack([s.doc_selected for s in selections])
      present = selections[0].doc_present
    extras = {}
    if "pooled" in self.collect and routers:
      layers = jax.tree.map(lambda *xs: jnp.stack(xs), *[per_layer[i]["pooled"] for i in routers])
      extras["pooled"] = MemoryView(layers, routers)
    for name in ("prompt_kv", "kv"):  # per layer
      if name in self.collect:
        extras[name] = [per_layer[i][name] for i in range(self.config.num_layers)]
    if "cache" in per_layer[0]:  # decoding
      extras["cache"] = [per_layer[i]["cache"] for i in range(self.config.num_layers)]
    if "selection" in self.collect:  # per router layer, the selection objects of the view
      extras["selection"] = selections
    return MSAOutput(hidden=hidden, memory_hidden=memory_hidden, doc_scores=scores,
                     doc_selected=selected, doc_present=present, extras=extras)

  def prompt_logits(self, prompt, memory=None, view: MemoryView | None = None):
    """(logits [B, S_q, V] in the compute dtype, MSAOutput): for inference and small shapes; training
    applies `lm_kernel` chunk by chunk instead."""
    out = self(prompt, memory, view)
    return self.logits(out.hidden), out

  def lm_kernel(self):
    """The LM head as an [E, V] matrix in the compute dtype (the embedding when tied)."""
    c = self.config
    kernel = self.embed_tokens.embedding.T if c.tie_word_embeddings else self.lm_head
    return kernel.astype(c.compute_dtype)

  def logits(self, hidden):
    out = jnp.dot(hidden.astype(self.config.compute_dtype), self.lm_kernel())
    return nn.with_logical_constraint(out, ("batch", "length", "act_vocab"))
