"""The Qwen3 SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import flax.linen as nn

from msa_jax.config import ModelConfig
from msa_jax.model.layers import Projection


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    common = dict(param_dtype=c.param_dtype, compute_dtype=c.compute_dtype,
                  init_std=c.initializer_range)
    e, m = c.hidden_size, c.intermediate_size
    gate = Projection((e,), (m,), ("embed",), ("mlp",), name="gate_proj", **common)(x)
    up = Projection((e,), (m,), ("embed",), ("mlp",), name="up_proj", **common)(x)
    hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    return Projection((m,), (e,), ("mlp",), ("embed",), name="down_proj", **common)(hidden)
