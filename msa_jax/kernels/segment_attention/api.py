"""Picks a segment-attention implementation: "blockwise" (flash-style XLA, default: O(S) memory,
skips tiles no query can see) or "reference" (dense, for tests and tiny shapes)."""

from __future__ import annotations

from msa_jax.kernels.segment_attention import blockwise, reference

IMPLEMENTATIONS = ("blockwise", "reference")


def segment_attention(q, k, v, q_seg, q_idx, kv_seg, kv_idx, *, implementation: str = "blockwise",
                      block_q: int = 512, block_kv: int = 512):
  """See `reference.segment_attention` for shapes and the masking rule."""
  if implementation == "blockwise":
    return blockwise.segment_attention(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block_q, block_kv)
  if implementation == "reference":
    return reference.segment_attention(q, k, v, q_seg, q_idx, kv_seg, kv_idx)
  raise ValueError(f"unknown segment attention implementation {implementation!r}; "
                   f"choose from {IMPLEMENTATIONS}")
