"""A memory view that forces given documents into every router layer's top-k selection.

The teacher-forced probe (`msa_jax.training.probe`) uses it to measure id reading and answer
copying with the gold documents attended whatever the router scored, so router errors drop out.
It wraps a `MemoryView` (selections with one column per document) and changes only the selection:
forced documents replace the lowest-scoring picks, the rest of the top-k stays (forced ones listed
first), and the reported scores remain the router's.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from msa_jax.config import MSAConfig
from msa_jax.model import router
from msa_jax.model.memory_view import LayerMemory, MemoryView


def force_selection(doc: router.DocumentScores, forced, k: int) -> router.Selection:
  """The top-k of `doc` with the present documents of `forced` [B, D] ranked first (all of them
  when they fit k_eff); the selection reports the router's scores of what it picked."""
  key = router.DocumentScores(jnp.where(forced & doc.present, jnp.inf, doc.scores), doc.present)
  selection = router.select_top_k(key, k)
  scores = jnp.take_along_axis(doc.scores, jnp.maximum(selection.doc_index, 0), axis=-1)
  return selection.replace(scores=jnp.where(selection.valid, scores, -jnp.inf))


@flax.struct.dataclass
class ForcedLayerMemory:
  """One router layer's memory whose `route` forces `forced` [..., B, D] bool into the top-k."""

  memory: LayerMemory
  forced: jax.Array

  def score_documents(self, q_r, route_mask, cfg: MSAConfig) -> router.DocumentScores:
    """The router's scores, which forcing leaves as they are."""
    return self.memory.score_documents(q_r, route_mask, cfg)

  def route(self, q_r, route_mask, cfg: MSAConfig) -> router.Selection:
    return force_selection(self.score_documents(q_r, route_mask, cfg), self.forced,
                           cfg.top_k_docs)

  def gather(self, selection: router.Selection):
    return self.memory.gather(selection)


@flax.struct.dataclass
class ForcedView:
  """`view` with the documents `forced` [B, D] (column d-1 = document d) in every router layer's
  selection."""

  view: MemoryView
  forced: jax.Array

  @property
  def router_layers(self) -> tuple[int, ...]:
    return self.view.router_layers

  def at(self, layer: int) -> ForcedLayerMemory:
    return ForcedLayerMemory(self.view.at(layer), self.forced)

  def span(self, start: int, end: int) -> ForcedLayerMemory:
    """A scanned block's memories: the forced mask repeated on the block's leading layer axis."""
    forced = jnp.broadcast_to(self.forced, (end - start, *self.forced.shape))
    return ForcedLayerMemory(self.view.span(start, end), forced)
