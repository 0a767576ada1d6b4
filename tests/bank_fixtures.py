"""An in-memory stand-in for `msa_jax.memory.bank.Bank` (the read API the serving side uses), built
from arrays or from `entry_points.encode_memory` output, so routing and views are tested without
the encoder."""

from __future__ import annotations

import numpy as np


class ArrayBank:
  """`router_layers`, `num_docs`, `num_chunks`, `doc_chunk_offsets`, `chunk_shape`, `read`,
  `read_rows` over arrays {name: [L_r, C, Hkv, D]}; counts the rows each read returns."""

  def __init__(self, router_layers, doc_chunk_offsets, arrays):
    self.router_layers = tuple(router_layers)
    self.doc_chunk_offsets = np.asarray(doc_chunk_offsets, np.int64)
    self.num_docs = self.doc_chunk_offsets.size - 1
    self.num_chunks = int(self.doc_chunk_offsets[-1])
    self.arrays = {name: np.asarray(a) for name, a in arrays.items()}
    self.chunk_shape = self.arrays["router_keys"].shape[2:]
    self.rows_read = 0

  def read(self, name, r, start, stop):
    self.rows_read += stop - start
    return self.arrays[name][r, start:stop]

  def read_rows(self, name, r, rows):
    rows = np.asarray(rows, np.int64)
    assert rows.size == 0 or (rows.min() >= 0 and rows.max() < self.num_chunks), rows
    self.rows_read += rows.size
    return self.arrays[name][r, rows]


def bank_from_encoded(view, row: int = 0) -> ArrayBank:
  """The documents of memory row `row` of an encoded `MemoryView` as a bank (documents in row order)."""
  layers = view.layers
  chunk_doc = np.asarray(layers.chunk_doc[0, row])
  order, counts = [], []
  for d in range(1, chunk_doc.max() + 1):
    slots = np.flatnonzero(chunk_doc == d)
    order.extend(slots)
    counts.append(slots.size)
  pick = lambda x: np.asarray(x[:, row])[:, order]
  return ArrayBank(view.router_layers, np.concatenate([[0], np.cumsum(counts)]),
                   {"router_keys": pick(layers.k_r), "content_k": pick(layers.k),
                    "content_v": pick(layers.v)})


def random_keys(rng, counts, hkv: int, d: int, *, ties=()):
  """Random router keys [C, Hkv, D] for documents of `counts` chunks, and their CSR offsets; each
  (src, dst) in `ties` copies document src's keys onto document dst (same chunk count), so their
  scores tie exactly."""
  offsets = np.concatenate([[0], np.cumsum(counts)])
  keys = rng.standard_normal((offsets[-1], hkv, d)).astype(np.float32)
  for src, dst in ties:
    assert counts[src] == counts[dst]
    keys[offsets[dst]:offsets[dst + 1]] = keys[offsets[src]:offsets[src + 1]]
  return keys, offsets


def random_bank(seed: int, counts, hkv: int, d: int, *, ties=()) -> ArrayBank:
  """A one-router-layer bank of random keys and content (the same for the same seed)."""
  rng = np.random.default_rng(seed)
  keys, offsets = random_keys(rng, counts, hkv, d, ties=ties)
  content = rng.standard_normal((2,) + keys.shape).astype(np.float32)
  return ArrayBank((0,), offsets, {"router_keys": keys[None], "content_k": content[:1],
                                   "content_v": content[1:]})
