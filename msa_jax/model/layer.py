"""One MSA decoder layer over the two streams (DESIGN.md "The core formulation").

Memory stream: every token attends causally within its own document, in every layer. Prompt stream:
causal within the prompt; in router layers it also attends to the pooled K̄/V̄ of the documents this
layer selected, except the template head (the prompt's memory-blind prefix). Non-router layers give
the prompt no memory.

One method per caller, all sharing the same parameters and code: `__call__` (training: both streams,
the layer routes over its own pooled memory stream), `encode` (memory stream only), `prefill`
(prompt stream over an external layer memory) and `decode` (new prompt-stream tokens appended to a
cache holding what the prefill attended: memory is not routed again, MSA_REFERENCE_IMPL.md §3.3).
The scanned methods share the signature `(carry, batch, xs) -> (carry, ys)`, so one `nn.scan`
(in_axes=(broadcast, 0)) serves them all.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from msa_jax.config import ModelConfig, MSAConfig
from msa_jax.kernels.segment_attention.api import fitted_block, segment_attention
from msa_jax.model import router
from msa_jax.model.attention import Attention
from msa_jax.model.layers import RMSNorm
from msa_jax.model.memory_view import LayerMemory
from msa_jax.model.mlp import MLP
from msa_jax.model.pooling import chunk_mean


def _row_index(tokens):
  b, s = tokens.shape[:2]
  return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))


def first_memory_index(sees_memory):
  """Per row, the index of the first memory-seeing prompt token (S_q if none): selected chunks sit
  there in the official packed layout, right after the template head."""
  s = sees_memory.shape[-1]
  return jnp.where(jnp.any(sees_memory, axis=-1), jnp.argmax(sees_memory, axis=-1), s)


def _named_scope(name: str):
  """Runs a method inside `jax.named_scope(name)`, so profiles show the stream it belongs to."""
  def wrap(fn):
    @functools.wraps(fn)
    def scoped(*args, **kwargs):
      with jax.named_scope(name):
        return fn(*args, **kwargs)
    return scoped
  return wrap


@flax.struct.dataclass
class PromptLayerOutput:
  """What one layer's prompt stream hands out: `selection` (the view's, router layers that routed;
  else None) and `kv = (k, v, kv_seg, kv_idx)`: every key the prompt attended (the gathered memory
  chunks, then the prompt's post-RoPE K/V), which seeds a decode cache."""

  selection: Any
  kv: tuple


class MSADecoderLayer(nn.Module):
  """Pre-norm Qwen3 layer with MSA attention; see the module docstring for its methods."""

  config: ModelConfig
  msa: MSAConfig
  is_router_layer: bool = False
  attention_impl: str = "blockwise"

  def setup(self):
    c = self.config
    self.attn = Attention(c, self.is_router_layer)
    self.input_norm = RMSNorm(c.rms_norm_eps, c.param_dtype)
    self.post_attn_norm = RMSNorm(c.rms_norm_eps, c.param_dtype)
    self.mlp = MLP(c)

  def _attend(self, q, k, v, q_seg, q_idx, kv_seg, kv_idx, block_q=None):
    block = self.config.attention_block
    return segment_attention(q, k, v, q_seg, q_idx, kv_seg, kv_idx,
                             implementation=self.attention_impl, block_q=block_q or block,
                             block_kv=block)

  def _finish(self, x, attended):
    x = x + self.attn.o_proj(attended)
    x = x + self.mlp(self.post_attn_norm(x))
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

  # ------------------------------------------------------------------ the two streams

  @_named_scope("memory_stream")
  def _memory_stream(self, x, memory):
    """(x, the layer's pooled `LayerMemory` (router layers; else None))."""
    h = self.input_norm(x)
    q, k, v = self.attn.qkv(h, memory.positions)
    seg, idx = memory.segment_ids, _row_index(memory.tokens)
    x = self._finish(x, self._attend(q, k, v, seg, idx, seg, idx))
    if not self.is_router_layer:
      return x, None
    k_r = k if not self.msa.decouple_router else self.attn.router_projections(h)[1]
    pool = lambda y: chunk_mean(y, memory.chunk_ids, memory.chunk_len)
    pooled = LayerMemory(pool(k).astype(k.dtype), pool(v).astype(v.dtype), pool(k_r),
                         memory.chunk_doc, coupled=not self.msa.decouple_router)
    return x, pooled

  @_named_scope("prompt_stream")
  def _prompt_stream(self, x, prompt, layer_memory, route=None
                     ) -> tuple[jax.Array, PromptLayerOutput, Any]:
    """Router layers with a memory route, gather and attend over [selected chunks | prompt];
    without one (an empty memory) the prompt attends to itself only. `route(q_r) -> (selection,
    aux)` replaces the view's `route` (training keeps its document scores as `aux`)."""
    h = self.input_norm(x)
    q, k, v = self.attn.qkv(h, prompt.positions)
    q_seg, q_idx = prompt.segment_ids, _row_index(prompt.tokens)
    kv_seg, kv_idx = q_seg, q_idx
    selection = aux = None
    if self.is_router_layer and layer_memory is not None:
      q_r = self.attn.router_projections(h)[0] if self.msa.decouple_router else q
      with jax.named_scope("route"):
        if route is None:
          selection = layer_memory.route(q_r, prompt.route_mask, self.msa)
        else:
          selection, aux = route(q_r)
      with jax.named_scope("gather"):
        mem_k, mem_v, mem_mask = layer_memory.gather(selection)
      n = mem_mask.shape[-1]
      first = first_memory_index(prompt.sees_memory)
      k = jnp.concatenate([mem_k.astype(k.dtype), k], axis=1)
      v = jnp.concatenate([mem_v.astype(v.dtype), v], axis=1)
      kv_seg = jnp.concatenate([mem_mask.astype(q_seg.dtype), q_seg], axis=1)
      kv_idx = jnp.concatenate([jnp.broadcast_to(first[:, None], (q_seg.shape[0], n)).astype(
          q_idx.dtype), q_idx], axis=1)
    elif self.is_router_layer and self.is_initializing():
      self.attn.router_projections(h)  # a prompt-only init still creates the router parameters
    x = self._finish(x, self._attend(q, k, v, q_seg, q_idx, kv_seg, kv_idx))
    return x, PromptLayerOutput(selection, (k, v, kv_seg, kv_idx)), aux

  # ------------------------------------------------------------------ one method per caller

  def __call__(self, carry, batch, xs=None):
    """Training: carry (x_mem | None, x_prompt), batch (memory | None, prompt) -> (selection,
    `router.DocumentScores`) (router layers with a memory stream; else None). Routes over this
    layer's own pooled chunks, keeping every document's score for the aux loss."""
    x_mem, x_prompt = carry
    memory, prompt = batch
    pooled = None
    if memory is not None:
      x_mem, pooled = self._memory_stream(x_mem, memory)

    def route(q_r):
      doc = pooled.score_documents(q_r, prompt.route_mask, self.msa)
      return router.select_top_k(doc, self.msa.top_k_docs), doc

    x_prompt, out, doc = self._prompt_stream(x_prompt, prompt, pooled, route)
    return (x_mem, x_prompt), (None if doc is None else (out.selection, doc))

  def encode(self, x, memory, xs=None):
    """Stage 1: the memory stream only -> (x, this layer's `LayerMemory` or None)."""
    return self._memory_stream(x, memory)

  def prefill(self, x, prompt, layer_memory=None):
    """Stage 2: the prompt stream over `layer_memory` (None: no memory) -> (x, PromptLayerOutput)."""
    return self._prompt_stream(x, prompt, layer_memory)[:2]

  def scored_prefill(self, x, prompt, layer_memory=None):
    """`prefill` that also keeps every document's score, `layer_memory.score_documents` (views
    holding every document's keys: the in-memory ones) -> (x, (PromptLayerOutput,
    `router.DocumentScores` or None)). The selection is still the view's `route`."""
    def route(q_r):
      return (layer_memory.route(q_r, prompt.route_mask, self.msa),
              layer_memory.score_documents(q_r, prompt.route_mask, self.msa))

    x, out, doc = self._prompt_stream(x, prompt, layer_memory, route)
    return x, (out, doc)

  @_named_scope("decode")
  def decode(self, x, prompt, cache):
    """Stage 3: the prompt's new tokens are written into `cache` (an object with
    `append(k, v, seg) -> (cache, q_idx)`, see `msa_jax.inference.kv_cache`) and attend over it
    through the attention dispatch -> (x, the updated cache)."""
    h = self.input_norm(x)
    q, k, v = self.attn.qkv(h, prompt.positions)
    cache, q_idx = cache.append(k, v, prompt.segment_ids)
    # a few new queries against the whole cache: query tiles sized to them, key tiles streamed
    # (the cache's empty tail and unseen tiles are skipped, no [B, H, n, S] scores)
    n = q.shape[1]
    attended = self._attend(q, cache.k, cache.v, prompt.segment_ids, q_idx, cache.seg, cache.idx,
                            block_q=fitted_block(self.config.attention_block, n))
    return self._finish(x, attended), cache
