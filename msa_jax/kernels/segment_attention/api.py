"""Picks a segment-attention implementation.

  auto        cudnn on a GPU, splash on a TPU, blockwise elsewhere (CPU); wherever blockwise would
              run, self-attention takes the band when it is exact (below)
  blockwise   flash-style XLA (`blockwise.py`): O(S) memory, skips tiles no query can see; the
              portable fallback of every kernel. Forced, it runs alone (no band)
  banded      loop-free band for rows of short documents (`banded.py`): query block i attends key
              blocks i-1..i+1 only. Forced, it ignores the memory budget; a batch it is not exact
              for, or keys and queries of different lengths, still go to blockwise
  reference   dense (`reference.py`): the truth, for tests and tiny shapes
  cudnn       cuDNN flash attention via `jax.nn.dot_product_attention` (`cudnn.py`)
  splash      splash attention on Mosaic TPU (`splash.py`); forced on CPU it runs in interpret mode

A kernel falls back to blockwise, warning once per reason, when the static call is not its own
(backend, dtype, head_dim, lengths: its `unsupported`). Which masks each expresses is in its module
docstring; a batch whose (seg, idx) it cannot express goes to blockwise on device (`lax.cond`).

The band: where blockwise would run (auto on CPU, every kernel's static or on-device fallback) and
queries and keys have the same length, `banded.band_or_blockwise` runs
`lax.cond(band_is_exact, banded, blockwise)` over `block_kv`-token blocks: one cond per call, and
on the banded branch no per-tile cond or dynamic-trip loop (on a GPU each of those copies its
predicate to the host). Only when the band's transient window scores fit
`banded.BAND_BUDGET_BYTES`: the untaken branch's buffers count in XLA's memory plan too.
"""

from __future__ import annotations

import jax

from msa_jax.kernels import registry
from msa_jax.kernels.segment_attention import banded, blockwise, cudnn, reference, splash

IMPLEMENTATIONS = ("auto", "blockwise", "banded", "reference", "cudnn", "splash")
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


def fitted_block(block: int, length: int) -> int:
  """`block`, or the smallest power of two that holds `length` tokens if that is smaller: a tile
  larger than the sequence only adds padded rows and columns to every score tile (a 128-token
  memory in 512-token tiles computed 16x the scores it needs)."""
  return min(block, 1 << max(length - 1, 0).bit_length())


def segment_attention(q, k, v, q_seg, q_idx, kv_seg, kv_idx, *, implementation: str = "auto",
                      block_q: int = 512, block_kv: int = 512):
  """See `reference.segment_attention` for shapes and the masking rule; block sizes are the
  blockwise kernel's (also when it is a kernel's fallback), each cut to `fitted_block` of its
  sequence there; the band's blocks are `block_kv`."""
  name = resolve(implementation)
  args = (q, k, v, q_seg, q_idx, kv_seg, kv_idx)
  if name == "reference":
    return reference.segment_attention(*args)
  xla_blocks = fitted_block(block_q, q.shape[1]), fitted_block(block_kv, k.shape[1])
  if implementation == "blockwise":
    return blockwise.segment_attention(*args, *xla_blocks)
  if name == "banded":
    if q.shape[1] != k.shape[1]:
      registry.warn_fallback(_warned, "segment attention", name,
                             "it needs as many keys as queries", "blockwise")
    return banded.band_or_blockwise(*args, *xla_blocks, gated=False)
  if name in ("cudnn", "splash"):
    why = _why_not(name, q, k)
    if why is None and name == "cudnn":
      return cudnn.segment_attention(*args, block_q, block_kv)
    if why is None:
      return splash.segment_attention(*args, block_q, block_kv,
                                      interpret=jax.default_backend() == "cpu")
    registry.warn_fallback(_warned, "segment attention", name, why, "blockwise")
  return banded.band_or_blockwise(*args, *xla_blocks)
