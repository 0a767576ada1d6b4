"""Qwen3 self-attention: q/k/v projections, per-head q/k RMSNorm before RoPE, GQA, output projection.

Router layers also own the MSA router projections `router_q` (hidden -> Hq*D) and `router_k`
(hidden -> Hkv*D), bias-free, applied to the same post-input-norm hidden state (MSA_REFERENCE_IMPL §2.4).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from msa_jax.config import ModelConfig
from msa_jax.model.layers import Projection, RMSNorm
from msa_jax.model.rope import apply_rope

_MASKED = -1e30  # finite, so fully-masked (padding) query rows give a uniform softmax, never NaN


def grouped_attention(q, k, v, mask):
  """Softmax attention with grouped KV heads.

  q [B, S, H, D], k/v [B, T, Hkv, D], mask [B, S, T] (True = may attend). Query head h uses KV head
  h // (H // Hkv), as HF's repeat_kv. Scores and softmax in float32; returns [B, S, H, D] in q.dtype.
  """
  b, s, h, d = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, s, hkv, h // hkv, d)
  scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32)
  scores = scores * (1.0 / jnp.sqrt(jnp.float32(d)))
  scores = jnp.where(mask[:, None, None], scores, _MASKED)
  probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
  probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
  out = jnp.einsum("bkgst,btkd->bskgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, s, h, d).astype(q.dtype)


def causal_segment_mask(segment_ids):
  """[B, S, S] mask: causal within equal non-zero segment ids (0 = padding attends nothing)."""
  s = segment_ids.shape[-1]
  causal = jnp.arange(s)[:, None] >= jnp.arange(s)[None, :]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return causal[None] & same & (segment_ids[:, None, :] > 0)


class Attention(nn.Module):
  """Qwen3 attention; `is_router_layer` adds the MSA router projections."""

  config: ModelConfig
  is_router_layer: bool = False

  def setup(self):
    c = self.config
    common = dict(param_dtype=c.param_dtype, compute_dtype=c.compute_dtype,
                  init_std=c.initializer_range)
    e, h, kv, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    self.q_proj = Projection((e,), (h, d), ("embed",), ("heads", "head_dim"), **common)
    self.k_proj = Projection((e,), (kv, d), ("embed",), ("kv_heads", "head_dim"), **common)
    self.v_proj = Projection((e,), (kv, d), ("embed",), ("kv_heads", "head_dim"), **common)
    self.o_proj = Projection((h, d), (e,), ("heads", "head_dim"), ("embed",), **common)
    self.q_norm = RMSNorm(c.rms_norm_eps, c.param_dtype, axis_name="head_dim")
    self.k_norm = RMSNorm(c.rms_norm_eps, c.param_dtype, axis_name="head_dim")
    if self.is_router_layer:
      self.router_q = Projection((e,), (h, d), ("embed",), ("heads", "head_dim"), **common)
      self.router_k = Projection((e,), (kv, d), ("embed",), ("kv_heads", "head_dim"), **common)

  def qkv(self, x, positions):
    """Post-norm, post-RoPE q [B,S,H,D] and k [B,S,Hkv,D], and v [B,S,Hkv,D]."""
    theta = self.config.rope_theta
    q = apply_rope(self.q_norm(self.q_proj(x)), positions, theta)
    k = apply_rope(self.k_norm(self.k_proj(x)), positions, theta)
    v = self.v_proj(x)
    q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "head_dim"))
    k = nn.with_logical_constraint(k, ("batch", "length", "act_kv_heads", "head_dim"))
    v = nn.with_logical_constraint(v, ("batch", "length", "act_kv_heads", "head_dim"))
    return q, k, v

  def router_projections(self, x):
    """Router queries [B,S,H,D] and keys [B,S,Hkv,D]: no RoPE, no norm."""
    return self.router_q(x), self.router_k(x)

  def __call__(self, x, positions, mask):
    q, k, v = self.qkv(x, positions)
    if self.is_initializing() and self.is_router_layer:
      self.router_projections(x)  # create the router parameters at init
    return self.o_proj(grouped_attention(q, k, v, mask))
