"""One MSA decoder layer over the two streams (DESIGN.md "The core formulation").

Memory stream: every token attends causally within its own document, in every layer. Prompt stream:
causal within the prompt; in router layers it also attends to the pooled K̄/V̄ of the documents this
layer selected, except the template head (the prompt's memory-blind prefix). Non-router layers give
the prompt no memory. The same code serves training (both streams; the layer routes over its own
pooled memory stream), encoding (memory stream only), prefill (prompt stream over an external
`LayerMemory`) and decode (new prompt-stream tokens appended to a `layer_cache` holding what the
prefill attended: memory is not routed again, MSA_REFERENCE_IMPL.md §3.3).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from msa_jax.config import ModelConfig, MSAConfig
from msa_jax.kernels.segment_attention.api import segment_attention
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


class MSADecoderLayer(nn.Module):
  """Pre-norm Qwen3 layer with MSA attention. Scannable signature:
  `((x_mem, x_prompt), memory, prompt, layer_memory) -> ((x_mem, x_prompt), outputs)`.

  `outputs` (router layers): "selection" when the prompt routed; "pooled" (the layer's `LayerMemory`)
  when `collect` asks for it; "prompt_kv" (post-RoPE K, V of the prompt stream) likewise; "kv"
  (every key the prompt attended, with its segment and index: the gathered memory chunks then the
  prompt) likewise, to seed a decode cache. With `layer_cache` (decode: an object with `append(k, v, seg) ->
  (cache, q_idx)`, see `msa_jax.inference.kv_cache`) the prompt stream's tokens are written into the
  cache and attend over it; outputs["cache"] is the updated cache.
  """

  config: ModelConfig
  msa: MSAConfig
  is_router_layer: bool = False
  attention_impl: str = "blockwise"
  collect: tuple[str, ...] = ()

  def _attend(self, q, k, v, q_seg, q_idx, kv_seg, kv_idx):
    block = self.config.attention_block
    return segment_attention(q, k, v, q_seg, q_idx, kv_seg, kv_idx,
                             implementation=self.attention_impl, block_q=block, block_kv=block)

  @nn.compact
  def __call__(self, streams, memory, prompt, layer_memory: LayerMemory | None, layer_cache=None):
    c = self.config
    x_mem, x_prompt = streams
    attn = Attention(c, self.is_router_layer, name="attn")
    input_norm = RMSNorm(c.rms_norm_eps, c.param_dtype, name="input_norm")
    post_norm = RMSNorm(c.rms_norm_eps, c.param_dtype, name="post_attn_norm")
    mlp = MLP(c, name="mlp")

    def finish(x, attended):
      x = x + attn.o_proj(attended)
      x = x + mlp(post_norm(x))
      return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

    outputs = {}
    if x_mem is not None:
      h = input_norm(x_mem)
      q, k, v = attn.qkv(h, memory.positions)
      seg, idx = memory.segment_ids, _row_index(memory.tokens)
      x_mem = finish(x_mem, self._attend(q, k, v, seg, idx, seg, idx))
      if self.is_router_layer and layer_memory is None:
        k_r = k if not self.msa.decouple_router else attn.router_projections(h)[1]
        pool = lambda x: chunk_mean(x, memory.chunk_ids, memory.chunk_len)
        layer_memory = LayerMemory(pool(k).astype(k.dtype), pool(v).astype(v.dtype), pool(k_r),
                                   memory.chunk_doc, coupled=not self.msa.decouple_router)
        if "pooled" in self.collect:
          outputs["pooled"] = layer_memory

    if x_prompt is not None:
      h = input_norm(x_prompt)
      q, k, v = attn.qkv(h, prompt.positions)
      if "prompt_kv" in self.collect:
        outputs["prompt_kv"] = (k, v)
      q_seg, q_idx = prompt.segment_ids, _row_index(prompt.tokens)
      kv_seg, kv_idx = q_seg, q_idx
      if layer_cache is not None:
        layer_cache, q_idx = layer_cache.append(k, v, q_seg)
        outputs["cache"] = layer_cache
        # a few new queries against the whole cache: query tiles sized to them, key tiles
        # streamed (the cache's empty tail and unseen tiles are skipped, no [B, H, n, S] scores)
        n = q.shape[1]
        attended = segment_attention(
            q, layer_cache.k, layer_cache.v, q_seg, q_idx, layer_cache.seg, layer_cache.idx,
            implementation=self.attention_impl, block_q=min(1 << (n - 1).bit_length(),
                                                            self.config.attention_block),
            block_kv=self.config.attention_block)
        return (x_mem, finish(x_prompt, attended)), outputs
      if self.is_router_layer and layer_memory is not None:
        q_r = attn.router_projections(h)[0] if self.msa.decouple_router else q
        selection = layer_memory.route(q_r, prompt.route_mask, self.msa)
        outputs["selection"] = selection
        mem_k, mem_v, mem_mask = layer_memory.gather(selection)
        n = mem_mask.shape[-1]
        first = first_memory_index(prompt.sees_memory)
        k = jnp.concatenate([mem_k.astype(k.dtype), k], axis=1)
        v = jnp.concatenate([mem_v.astype(v.dtype), v], axis=1)
        kv_seg = jnp.concatenate([mem_mask.astype(q_seg.dtype), q_seg], axis=1)
        kv_idx = jnp.concatenate([jnp.broadcast_to(first[:, None], (q_seg.shape[0], n)).astype(
            q_idx.dtype), q_idx], axis=1)
      elif self.is_router_layer and self.is_initializing():
        attn.router_projections(h)  # a prompt-only init still creates the router parameters
      if "kv" in self.collect:
        outputs["kv"] = (k, v, kv_seg, kv_idx)
      x_prompt = finish(x_prompt, self._attend(q, k, v, q_seg, q_idx, kv_seg, kv_idx))
    return (x_mem, x_prompt), outputs
