"""Rotary position embedding in the Hugging Face "rotate half" layout, at arbitrary int32 positions.

MSA needs arbitrary positions: documents restart at 0 (document-wise RoPE) and the question starts
at `template_len + top_k`, so positions are always an explicit argument.
"""

from __future__ import annotations

import jax.numpy as jnp


def rope_angles(positions, head_dim: int, theta: float):
  """cos, sin of shape positions.shape + [head_dim], float32 (frequencies repeated twice, as HF)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, positions, theta: float):
  """Rotates x [..., S, H, D] at positions [..., S]; computed in float32, returned in x.dtype."""
  cos, sin = rope_angles(positions, x.shape[-1], theta)
  cos, sin = cos[..., None, :], sin[..., None, :]
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)
