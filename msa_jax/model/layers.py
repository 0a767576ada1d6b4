"""Small building blocks shared by the decoder: dtype lookup, logically-partitioned projections, RMSNorm.

Every parameter carries logical axis names (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`,
`norm`); `msa_jax.sharding.LOGICAL_RULES` maps them to mesh axes.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def dtype_of(name: str) -> jnp.dtype:
  return jnp.dtype(name)


@jax.custom_vjp
def embedding_lookup(table: jnp.ndarray, tokens: jnp.ndarray) -> jnp.ndarray:
  """`table[tokens]` in the table's dtype, whose gradient sums each token's row in float32.

  Autodiff would transpose the gather into a scatter-add in the table's dtype: in bf16 a GPU has
  no native atomic add for it, and with a small vocabulary the rows collide (80 ms of a 431 ms
  train step on the 25M-param variant, bench_train_loop profile, H200, 2026-12-02). Casting the
  whole table to float32 first would fix the sum but cost a full-table copy in every forward,
  decode steps included."""
  return jnp.take(table, tokens, axis=0)


def _lookup_fwd(table, tokens):
  return jnp.take(table, tokens, axis=0), (table, tokens)


def _lookup_bwd(residuals, cotangent):
  table, tokens = residuals
  rows = cotangent.reshape(-1, table.shape[-1]).astype(jnp.float32)
  grad = jnp.zeros(table.shape, jnp.float32).at[tokens.reshape(-1)].add(rows)
  return grad.astype(table.dtype), None


embedding_lookup.defvjp(_lookup_fwd, _lookup_bwd)


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
