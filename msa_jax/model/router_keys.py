"""Router keys as a memory bank stores and serves them (DESIGN.md "Memory bank").

  bfloat16  the default: half the bytes of float32 (the official code keeps its keys in bf16)
  int8      a quarter, with one float32 scale per chunk and KV head (symmetric:
            scale = max|x| / 127 over head_dim), kept beside the values as [C, Hkv]
  float32   the exact keys (what the training forward routes over)

Scores always accumulate in float32. With bfloat16 or int8 keys the router query enters the score
matmul in bfloat16 as well (`query_dtype`), so a kernel runs the bf16 x bf16 -> f32 path of the
tensor cores: int8 values are exact in bfloat16, and the scale multiplies each KV head's partial
score. Quantisation happens once, when the bank is written; serving prepares the stored keys for
the score mode (`prepare`) without quantising twice where it can (int8 cosine keys keep their
values and only change their scale).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from msa_jax.config import MSAConfig
from msa_jax.model import router

KEY_DTYPES = ("bfloat16", "int8", "float32")
DEFAULT_KEY_DTYPE = "bfloat16"
_INT8_MAX = 127.0


def check_key_dtype(key_dtype: str) -> str:
  if key_dtype not in KEY_DTYPES:
    raise ValueError(f"router key dtype must be one of {KEY_DTYPES}, got {key_dtype!r}")
  return key_dtype


def has_scale(key_dtype) -> bool:
  """Whether keys of this dtype carry per-chunk, per-head scales."""
  return jnp.dtype(key_dtype) == jnp.int8


def quantize(k, key_dtype: str):
  """Float keys [..., Hkv, D] -> (values in `key_dtype`, float32 scales [..., Hkv] or None)."""
  k = jnp.asarray(k, jnp.float32)
  if not has_scale(check_key_dtype(key_dtype)):
    return k.astype(key_dtype), None
  scale = jnp.max(jnp.abs(k), axis=-1) / _INT8_MAX
  safe = jnp.where(scale > 0, scale, 1.0)[..., None]
  values = jnp.clip(jnp.round(k / safe), -_INT8_MAX, _INT8_MAX).astype(jnp.int8)
  return values, scale


def dequantize(values, scale=None):
  """(values, scales or None) -> float32 keys [..., Hkv, D]."""
  k = values.astype(jnp.float32)
  return k if scale is None else k * scale[..., None]


def query_dtype(key_dtype):
  """The dtype router queries enter the score matmul in: float32 for float32 keys, else bfloat16."""
  return jnp.float32 if jnp.dtype(key_dtype) == jnp.float32 else jnp.bfloat16


def prepare(values, scale, cfg: MSAConfig):
  """Stored keys -> keys as the scores use them, in the same dtype (`router.prepare_keys`: cosine
  L2-normalises per chunk and head). Int8 cosine keys keep their values: v·s / |v·s| = v / |v|,
  so only the scale becomes 1/|v|."""
  if scale is None:
    return router.prepare_keys(values, cfg).astype(values.dtype), None
  if cfg.score_mode != "cosine":
    return values, scale
  v = values.astype(jnp.float32)
  return values, lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=-1), router.EPS))
