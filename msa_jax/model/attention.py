"""Qwen3 self-attention: q/k/v projections, per-head q/k RMSNorm before RoPE, GQA, output projection.

Router layers also own the MSA router projections `router_q` (hidden -> Hq*D) and `router_k`
(hidden -> Hkv*D), bias-free, applied to the same post-input-norm hidden state (MSA_REFERENCE_IMPL §2.4).
"""

from __future__ import annotations

import flax.linen as nn

from msa_jax.config import ModelConfig
from msa_jax.model.layers import Projection, RMSNorm
from msa_jax.model.rope import apply_rope


class Attention(nn.Module):
  """Qwen3 attention projections; `is_router_layer` adds the MSA router projections. The attention
  itself (which keys a query sees) is the MSA layer's business (`msa_jax.model.layer`)."""

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
