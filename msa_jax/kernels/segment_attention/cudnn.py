"""cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`) for the masks it
can express, through `layout.causal_layout`: `is_causal=True` plus `query_seq_lengths =
key_value_seq_lengths =` the live prefix.

What it expresses, and what goes to the blockwise fallback:
  * prompt stream over [selected chunks | prompt] (router layers, prefill): yes. After the
    permutation the template head precedes the chunks, unselected chunk slots and prompt padding
    sit in the tail past the sequence length; chunk places carry a zero query whose output is
    dropped (m extra query rows, m = chunk slots, small next to the prompt).
  * prompt stream alone, and a memory row holding one document: yes (the permutation is the
    identity).
  * memory rows packing several documents: no. `jax.nn.dot_product_attention` has no segment ids;
    a dense `mask` becomes an [B,1,S,S] bias (O(S^2) HBM: 8 GiB a 64K row), and the packed THD
    layout (`q_offsets`, only in the private `jax._src.cudnn` API) saves a [B*M, H, S] f32
    log-sum-exp for M segment slots per row (512 MiB a 64K row of 64 documents, per layer).
    Merging one cuDNN call per document by log-sum-exp is not exact either: cuDNN's backward drops
    the residual's cotangent. So these rows take the blockwise kernel (or the band when
    it is exact and fits, `banded.band_or_blockwise`).
  * decode (a few queries against a cache): no, the queries are not the keys' tail.
The test is on device (`layout.ok`), so one jitted program holds both branches behind `lax.cond`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from msa_jax.kernels.segment_attention import banded, layout as layout_lib

_DTYPES = (jnp.bfloat16, jnp.float16)


def unsupported(q_shape, kv_shape, dtype, *, backend: str) -> str | None:
  """Why cuDNN cannot take these static shapes (None: it can, subject to the on-device test)."""
  if backend != "gpu":
    return f"cuDNN needs a GPU, the backend is {backend}"
  if jnp.dtype(dtype) not in tuple(map(jnp.dtype, _DTYPES)):
    return f"cuDNN flash attention takes bfloat16/float16, got {jnp.dtype(dtype).name}"
  d = q_shape[-1]
  if d > 256 or d % 8:
    return f"cuDNN flash attention needs head_dim <= 256 and a multiple of 8, got {d}"
  if kv_shape[1] < q_shape[1]:
    return "fewer keys than queries"
  return None


def causal_attention(q, k, v, lay: layout_lib.CausalLayout, *, implementation: str = "cudnn"):
  """Attention over the layout through `jax.nn.dot_product_attention`; `implementation="xla"`
  runs the same arguments on any backend (how CPU tests check the translation)."""
  qp, kp, vp = layout_lib.to_layout(lay, q, k, v)
  length = jnp.maximum(lay.length, 1)  # an empty row: one dead place, its output is dropped
  out = jax.nn.dot_product_attention(qp, kp, vp, is_causal=True, query_seq_lengths=length,
                                     key_value_seq_lengths=length, implementation=implementation)
  return layout_lib.from_layout(lay, out)


def segment_attention(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block_q, block_kv, *,
                      implementation: str = "cudnn"):
  """The reference's result: cuDNN when this batch's mask fits the layout, else blockwise (or the
  band, `banded.band_or_blockwise`)."""
  lay = layout_lib.causal_layout(q_seg, q_idx, kv_seg, kv_idx)
  return lax.cond(
      lay.ok,
      lambda: causal_attention(q, k, v, lay, implementation=implementation),
      lambda: banded.band_or_blockwise(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block_q,
                                       block_kv))
