"""Small building blocks shared by the decoder: dtype lookup, logically-partitioned projections, RMSNorm.

Every parameter carries logical axis names (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`,
`norm`); `msa_jax.sharding.LOGICAL_RULES` maps them to mesh axes.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


def dtype_of(name: str) -> jnp.dtype:
  return jnp.dtype(name)


class Projection(nn.Module):
  """A bias-free linear map contracting the trailing `len(in_shape)` input dims.

  The kernel has shape `in_shape + out_shape` with logical names `in_names + out_names`, so e.g. the
  query projection is `[embed, heads, head_dim]` and the output projection `[heads, head_dim, embed]`.
  """

  in_shape: Sequence[int]
  out_shape: Sequence[int]
  in_names: Sequence[str]
  out_names: Sequence[str]
  param_dtype: str
  compute_dtype: str
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x):
    shape = tuple(self.in_shape) + tuple(self.out_shape)
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                     tuple(self.in_names) + tuple(self.out_names)),
        shape, dtype_of(self.param_dtype))
    n_in = len(self.in_shape)
    x = x.astype(self.compute_dtype)
    return jnp.tensordot(x, kernel.astype(self.compute_dtype),
                         axes=(tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))))


class RMSNorm(nn.Module):
  """Qwen3 RMSNorm: normalise in float32, cast back to the input dtype, then scale."""

  eps: float
  param_dtype: str
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), dtype_of(self.param_dtype))
    x32 = x.astype(jnp.float32)
    normed = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))
    return scale.astype(x.dtype) * normed.astype(x.dtype)
