"""Memory views: what a router layer's prompt stream routes over and attends to.

The protocol (DESIGN.md) is per layer: `route(q_r, route_mask, cfg) -> router.Selection` (best-first
[B, k], the one selection type of every view) and `gather(selection) -> (k̄, v̄, mask)`. `LayerMemory` implements it over pooled chunk slots held as
arrays: the training forward builds one from the layer's own memory stream, and `MemoryView` stacks
one per router layer (the output of `encode_memory`) for prefill. The memory bank (`memory/bank_view.py`) provides
the same two methods over stored chunks.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from msa_jax.config import MSAConfig
from msa_jax.model import router


@flax.struct.dataclass
class LayerMemory:
  """Pooled chunk slots of one router layer.

  k, v       [B, C, Hkv, D]  chunk means of post-RoPE keys (document-local positions) and values
  k_r        [B, C, Hkv, D]  chunk means of router keys (float32, not normalised)
  chunk_doc  [B, C] int32    document id of each slot (1-based; 0 = empty)
  coupled    static: route with content q/K̄ (official coupled mode) instead of router projections
  """

  k: jax.Array
  v: jax.Array
  k_r: jax.Array
  chunk_doc: jax.Array
  coupled: bool = flax.struct.field(pytree_node=False, default=False)

  def score_documents(self, q_r, route_mask, cfg: MSAConfig) -> router.DocumentScores:
    """Every slot document's score: the training forward keeps them for the aux loss."""
    return router.score_documents(q_r, route_mask, self.k_r, self.chunk_doc, cfg,
                                  coupled_scale=self.coupled)

  def route(self, q_r, route_mask, cfg: MSAConfig) -> router.Selection:
    return router.select_top_k(self.score_documents(q_r, route_mask, cfg), cfg.top_k_docs)

  def gather(self, selection: router.Selection):
    """All slots, masked to the chunks of selected documents: (k̄, v̄, mask [B, C])."""
    doc = jnp.maximum(self.chunk_doc - 1, 0)
    selected = selection.mask(self.chunk_doc.shape[-1])
    mask = jnp.take_along_axis(selected, doc, axis=-1) & (self.chunk_doc > 0)
    return self.k, self.v, mask


@flax.struct.dataclass
class MemoryView:
  """One `LayerMemory` per router layer, stacked on a leading axis in `router_layers` order."""

  layers: LayerMemory
  router_layers: tuple[int, ...] = flax.struct.field(pytree_node=False)

  def at(self, layer: int) -> LayerMemory:
    r = self.router_layers.index(layer)
    return jax.tree.map(lambda x: x[r], self.layers)

  def span(self, start: int, end: int) -> LayerMemory:
    """The stacked memories of router layers start..end-1 (consecutive), for a scanned block."""
    r0, r1 = self.router_layers.index(start), self.router_layers.index(end - 1) + 1
    return jax.tree.map(lambda x: x[r0:r1], self.layers)

  def row(self, b: int) -> "MemoryView":
    """The encoded memory of row b alone (a one-row view, as the engine serves)."""
    return jax.tree.map(lambda x: x[:, b:b + 1], self)

  def for_batch(self, batch: int) -> "MemoryView":
    """An encoded memory of one row, shared by every request of a `batch`-row prefill."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, x.shape[:1] + (batch,) + x.shape[2:]), self)

  def serving_problem(self, config) -> str | None:
    """Why the engine cannot serve this view with a model of `config` (None: it can)."""
    shape = tuple(self.layers.k.shape)
    if shape[-2:] != (config.num_kv_heads, config.head_dim):
      return (f"the memory view's keys have {shape[-2]} heads of {shape[-1]} dims but the model "
              f"has {config.num_kv_heads} of {config.head_dim}: built by another model?")
    if shape[1] != 1:
      return (f"the engine serves one memory shared by all requests; this MemoryView holds "
              f"{shape[1]} memory rows (encode the memory as one row)")
    return None
