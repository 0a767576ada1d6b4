"""Picks a segment-attention implementation.

  auto        cudnn on a GPU, splash on a TPU, blockwise elsewhere (CPU)
  blockwise   flash-style XLA (`blockwise.py`): O(S) memory, skips tiles no query can see; the
              portable fallback of every kernel
  reference   dense (`reference.py`): the truth, for tests and tiny shapes
  cudnn       cuDNN flash attention via `jax.nn.dot_product_attention` (`cudnn.py`)
  splash      splash attention on Mosaic TPU (`splash.py`); forced on CPU it runs in interpret mode

A kernel falls back to blockwise, warning once per reason, when the static call is not its own
(backend, dtype, head_dim, lengths: its `unsupported`). Which masks each expresses is in its module
docstring; a batch whose (seg, idx) it cannot express goes to blockwise on device (`lax.cond`).
"""

from __future__ import annotations

import jax

from msa_jax.kernels import registry
from msa_jax.kernels.segment_attention import blockwise, cudnn, reference, splash

IMPLEMENTATIONS = ("auto", "blockwise", "reference", "cudnn", "splash")
_BY_BACKEND = {"gpu": "cudnn", "tpu": "splash"}
_warned: set[tuple[str, str]] = set()


def resolve(implementation: str) -> str:
  """The implementation `implementation` names on this backend ("auto" picks one)."""
  return registry.resolve("segment attention", implementation, IMPLEMENTATIONS, _BY_BACKEND,
                          "blockwise")


def _why_not(name, q, k):
  backend = jax.default_backend()
  if name == "cudnn":
    return cudnn.unsupported(q.shape, k.shape, q.dtype, backend=backend)
  return splash.unsupported(q.shape, k.shape, backend=backend, interpret=backend == "cpu")


def segment_attention(q, k, v, q_seg, q_idx, kv_seg, kv_idx, *, implementation: str = "auto",
                      block_q: int = 512, block_kv: int = 512):
  """See `reference.segment_attention` for shapes and the masking rule; block sizes are the
  blockwise kernel's (also when it is a kernel's fallback)."""
  name = resolve(implementation)
  if name == "reference":
    return reference.segment_attention(q, k, v, q_seg, q_idx, kv_seg, kv_idx)
  if name in ("cudnn", "splash"):
    why = _why_not(name, q, k)
    if why is None and name == "cudnn":
      return cudnn.segment_attention(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block_q, block_kv)
    if why is None:
      return splash.segment_attention(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block_q, block_kv,
                                      interpret=jax.default_backend() == "cpu")
    registry.warn_fallback(_warned, "segment attention", name, why, "blockwise")
  return blockwise.segment_attention(q, k, v, q_seg, q_idx, kv_seg, kv_idx, block_q, block_kv)
