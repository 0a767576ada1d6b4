"""Top-k agreement of low-precision router keys with float32: how often routing over bfloat16 or
int8 keys selects what float32 keys select.

For each key dtype, one router layer's float32 keys are quantised as a bank stores them
(`router_keys.quantize`), prepared and placed as serving does (`bank_view.place_router_keys`) and
routed through the serving path (`routing.route_sharded`); float32 keys through the same path are
the reference. The keys come through the `Bank` read API, so the same call measures random keys
(the tests) and a bank encoded with `router_key_dtype="float32"` by a trained model, with router
queries from real questions (a benchmark).

  selected         the fraction of float32's selections (request, document) the dtype makes too
  identical_sets   the fraction of requests whose set of selected documents is the same
  identical_order  the fraction of requests whose ranked list is the same
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from msa_jax.config import MSAConfig
from msa_jax.memory import bank_view, routing
from msa_jax.memory.routing import MEMORY_AXIS
from msa_jax.model import router_keys


@dataclasses.dataclass(frozen=True)
class Agreement:
  key_dtype: str
  requests: int
  selections: int  # float32 selections compared
  selected: float
  identical_sets: float
  identical_order: float


def compare(reference, index, key_dtype: str) -> Agreement:
  """Agreement of selections `index` with `reference`, both [B, k] document indices best first
  (-1 = none)."""
  reference, index = np.asarray(reference), np.asarray(index)
  chosen = [set(r[r >= 0].tolist()) for r in reference]
  got = [set(r[r >= 0].tolist()) for r in index]
  total = sum(len(c) for c in chosen)
  return Agreement(
      key_dtype=key_dtype, requests=len(chosen), selections=total,
      selected=sum(len(c & g) for c, g in zip(chosen, got)) / max(total, 1),
      identical_sets=float(np.mean([c == g for c, g in zip(chosen, got)])),
      identical_order=float(np.mean(np.all(reference == index, axis=1))))


def key_dtype_agreement(q_r, route_mask, read_rows, doc_chunk_offsets, cfg: MSAConfig, *, mesh,
                        layer: int = 0, key_dtypes=("bfloat16", "int8"),
                        coupled_scale: bool = False, implementation: str = "auto"
                        ) -> list[Agreement]:
  """Routes requests q_r [B,T,H,D] (raw router queries), route_mask [B,T] over router layer slot
  `layer` of float32 keys read by `read_rows(name, r, rows)` (documents as CSR chunk offsets) in
  float32 and in each of `key_dtypes`, on `mesh` (with a `memory` axis), routing by
  `implementation` (`kernels.routing.api`); returns each dtype's agreement with float32."""
  plan = routing.plan_shards(doc_chunk_offsets, mesh.shape[MEMORY_AXIS])
  chunk_doc = routing.place_table(mesh, plan.chunk_doc.reshape(-1))
  doc_index = routing.place_table(mesh, plan.doc_index.reshape(-1))
  row_shape = read_rows("router_keys", layer, np.zeros(1, np.int64)).shape[1:]
  route = jax.jit(lambda q, m, k, s: routing.route_sharded(
      q, m, k, chunk_doc, doc_index, cfg, mesh=mesh, num_docs=plan.num_docs,
      coupled_scale=coupled_scale, key_scale=s, implementation=implementation)[1])

  def selections(key_dtype):
    def read(name, _, rows):
      values, scale = router_keys.quantize(read_rows("router_keys", layer, rows), key_dtype)
      return np.asarray(values if name == "router_keys" else scale)

    keys, scale = bank_view.place_router_keys(plan, mesh, read, 1, row_shape, key_dtype, cfg)
    return route(q_r, route_mask, keys[0], None if scale is None else scale[0])

  reference = selections("float32")
  return [compare(reference, selections(d), d) for d in key_dtypes]
