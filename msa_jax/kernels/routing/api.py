"""Picks a routing implementation for one shard's document top-k.

  auto        pallas_gpu on a GPU, pallas_tpu on a TPU, reference elsewhere (CPU)
  reference   plain jnp (`reference.py`): the truth, and every kernel's fallback
  pallas_gpu  the fused kernel through Pallas Triton (`pallas_gpu.py`)
  pallas_tpu  the fused kernel on Mosaic TPU (`pallas_tpu.py`)

A Pallas kernel forced on CPU runs in interpret mode (that is how the tests run them). A kernel
covers every head, query and chunk reduction, score mode and key dtype; it falls back to the
reference, warning once per reason, on another backend than its own, or for shapes its compiler
cannot take: GPU head_dim not a power of two >= 16, or chunk slots per shard not a multiple of 16;
TPU head_dim not a multiple of 128, or chunk slots per shard not a multiple of 128; on either, a
head_dim so wide that fewer than 16 query rows fit the kernel's query tile (QUERY_BYTES); on GPU,
key tiles whose operands need more shared memory than a block has for 16 query rows (msa-4b's
float32 keys, or its head max: bf16 keys with the head mean run).
"""

from __future__ import annotations

import jax

from msa_jax.config import MSAConfig
from msa_jax.kernels import registry
from msa_jax.kernels.routing import fused, pallas_gpu, pallas_tpu, reference

IMPLEMENTATIONS = ("auto", "reference", "pallas_gpu", "pallas_tpu")
_KERNELS = {"pallas_gpu": pallas_gpu, "pallas_tpu": pallas_tpu}
_BY_BACKEND = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}
_warned: set[tuple[str, str]] = set()


def resolve(implementation: str) -> str:
  """The implementation `implementation` names on this backend ("auto" picks one)."""
  return registry.resolve("routing", implementation, IMPLEMENTATIONS, _BY_BACKEND, "reference")


def top_k_documents(q, route_mask, keys, key_scale, chunk_doc, num_docs: int, cfg: MSAConfig,
                    k: int, *, implementation: str = "auto"):
  """`reference.top_k_documents` (shapes, dtypes and result there) by `implementation`. The fused
  kernels need each document's chunks to be one contiguous run, as a `ShardPlan` lays them out."""
  name = resolve(implementation)
  if name != "reference":
    kernel = _KERNELS[name]
    interpret = jax.default_backend() == "cpu"
    why = kernel.unsupported(keys.shape, keys.dtype, interpret=interpret,
                             query_heads=fused.query_operands(q.shape[2], keys.shape[1], cfg))
    if why is None:
      return kernel.top_k_documents(q, route_mask, keys, key_scale, chunk_doc, num_docs, cfg, k,
                                    interpret=interpret)
    registry.warn_fallback(_warned, "routing", name, why, "the reference")
  return reference.top_k_documents(q, route_mask, keys, key_scale, chunk_doc, num_docs, cfg, k)
