"""The streaming document top-k both Pallas kernels run (pallas_gpu.py, pallas_tpu.py): the operand
layout they read, the math of one key tile, and the merge of their per-block results.

A kernel walks a shard's chunks in tiles of Ct (a grid axis on TPU, a loop on GPU) for a block of
Bb requests, and keeps per request the best K documents so far and the partial value of the one
document that runs on into the next tile. Within a key tile it walks the block's Bb·T query rows in
token tiles of Tt (`token_tile`: at most a kernel's bound, so no operand grows with T or Bb; a grid
axis on TPU, a loop on GPU). Chunks run down the rows, requests across the columns:

  scores  per token tile and KV head j (and, for the head max, query head g of its group): key tile
          [Ct, D] x queries [Tt, D] -> [Ct, Tt] in float32 (int8 keys enter as bf16 values, exact,
          and their scale multiplies the head's scores); the head mean sums over j (queries
          pre-summed over the group, `router_keys.query_dtype`) and divides by H, the head max
          takes the max
  tokens  each request's columns of the tile reduce to one: the max with a -inf bias off its route
          tokens ("last": only its last route token), or the mean as a weighted sum; a reduction
          over T is one over the tiles of the reductions over each, so the tiles combine exactly
          (max, or sum) into [Ct, Bb]
  chunks  a document's value is its chunks' max, or their mean (sums and counts through a [Ct, Ct]
          same-document matrix). The document carried in from the previous tile adds its partial
          value; the one that continues into the next tile is held back and carried (documents are
          contiguous runs of chunks, as a `ShardPlan` lays them out)
  top-k   K rounds: each request's best remaining document (ties to the lower column) replaces its
          worst kept one when it ranks higher
Documents rank by (score desc, column asc): `lax.top_k`'s order over document scores, so a kernel
selects exactly what `reference.top_k_documents` does, up to the order of float32 sums. Nothing of
size [B, T, C] or [B, C] is ever written.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from msa_jax.config import MSAConfig
from msa_jax.model import router_keys

NO_COLUMN = np.int32(2**30)  # a kept slot that holds no document yet


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static shape of a kernel call. `groups`: query heads per KV head in the score matmuls (1 for
  the head mean: pre-summed); `tokens`: T padded; `token_tile`: Tt, the query rows per score
  matmul (see `token_tile`); `keep`: K, the kept documents (pow2 >= k)."""

  heads: int
  kv_heads: int
  groups: int
  head_dim: int
  tokens: int
  token_tile: int
  block_rows: int
  block_chunks: int
  keep: int
  head_reduce: str
  query_reduce: str
  chunk_reduce: str
  scaled: bool
  exact: bool  # float32 keys: full-precision matmuls

  @property
  def token_tiles(self) -> int:
    """Token tiles per request block."""
    return self.block_rows * self.tokens // self.token_tile


class Operands(NamedTuple):
  """The kernel-side layout. queries [Hkv·groups, B_pad·T, D] in the operand dtype; route
  [B_pad·T / Tt, 1, Tt] f32 (bias or weight per token column, a row per token tile); keys
  [C, Hkv·D]; scale [C, Hkv] or None; chunk_doc [C, 1] int32 (and chunk_doc_row [1, C] for the
  chunk mean); continues [C / Ct] int32: the document running from tile t into t+1 (0: none)."""

  queries: jax.Array
  route: jax.Array
  keys: jax.Array
  scale: jax.Array | None
  chunk_doc: jax.Array
  chunk_doc_row: jax.Array | None
  continues: jax.Array


class State(NamedTuple):
  """Per block of requests: kept values/columns [K, Bb]; the carried document [1, 1] (0: none),
  its partial max or sum [1, Bb], chunk count [1, 1] and count of -inf chunks [1, Bb]."""

  values: jax.Array
  columns: jax.Array
  carry_doc: jax.Array
  carry_value: jax.Array
  carry_count: jax.Array
  carry_inf: jax.Array


def pow2(n: int) -> int:
  """The smallest power of two >= n."""
  return 1 << max(0, int(n) - 1).bit_length()


def tile_size(num_chunks: int, preferred: int) -> int:
  """The largest power of two <= `preferred` that divides `num_chunks` (chunk slots per shard
  come in multiples of `routing.SLOT_MULTIPLE`, so this is `preferred` in serving)."""
  size = 1
  while size * 2 <= preferred and num_chunks % (size * 2) == 0:
    size *= 2
  return size


def max_query_rows(head_dim: int, key_dtype, rows: int, nbytes: int) -> int:
  """The most query rows a score matmul may take under a kernel's bound: the largest power of two
  <= `rows` (a power of two) whose rows, in the query operand dtype, fill <= `nbytes` (at least 1;
  a kernel's `unsupported` refuses fewer than its compiler takes)."""
  fit = nbytes // (head_dim * jnp.dtype(router_keys.query_dtype(key_dtype)).itemsize)
  return min(rows, 1 << (max(fit, 1).bit_length() - 1))


def query_operands(heads: int, kv_heads: int, cfg: MSAConfig) -> int:
  """Query operands a key tile's scores take: one per KV head for the head mean (its queries are
  pre-summed over the group), one per query head for the head max."""
  return kv_heads if cfg.head_reduce == "mean" else heads


def token_tile(tokens: int, block_rows: int, max_rows: int) -> int:
  """Query rows per score matmul (`tokens` and `max_rows` are powers of two): `max_rows` of one
  request's tokens when they fill it, so a tile lies within one request; else the most whole
  requests that fit and divide the block (all of it when it fits)."""
  if tokens >= max_rows:
    return max_rows
  return tokens * math.gcd(block_rows, max_rows // tokens)


def layout(q, route_mask, keys, key_scale, chunk_doc, cfg: MSAConfig, k: int, *, block_rows: int,
           block_chunks: int, query_rows: int, query_bytes: int) -> tuple[Spec, Operands]:
  """Prepared queries q [B,T,H,D], route_mask [B,T], keys [C,Hkv,D] (+ scale), chunk_doc [C] ->
  the kernel's operands for blocks of `block_rows` requests, tiles of `block_chunks` chunks
  (which must divide C), and token tiles bounded by `query_rows` rows and `query_bytes` bytes of
  one head's queries (`max_query_rows`)."""
  b, t, h, d = q.shape
  c, hkv = keys.shape[:2]
  tokens = pow2(max(t, 16))
  rows = -(-b // block_rows) * block_rows
  tile = token_tile(tokens, block_rows, max_query_rows(d, keys.dtype, query_rows, query_bytes))
  spec = Spec(heads=h, kv_heads=hkv, groups=query_operands(h, hkv, cfg) // hkv,
              head_dim=d, tokens=tokens, token_tile=tile, block_rows=block_rows,
              block_chunks=block_chunks, keep=pow2(k), head_reduce=cfg.head_reduce,
              query_reduce=cfg.query_reduce, chunk_reduce=cfg.chunk_reduce,
              scaled=key_scale is not None,
              exact=jnp.dtype(keys.dtype) == jnp.float32)
  qg = q.reshape(b, t, hkv, h // hkv, d)
  if cfg.head_reduce == "mean":
    qg = jnp.sum(qg, axis=3, keepdims=True)
  qg = qg.astype(router_keys.query_dtype(keys.dtype))
  qg = jnp.pad(qg, ((0, rows - b), (0, tokens - t), (0, 0), (0, 0), (0, 0)))
  queries = jnp.transpose(qg, (2, 3, 0, 1, 4)).reshape(hkv * spec.groups, rows * tokens, d)
  mask = jnp.pad(route_mask, ((0, rows - b), (0, tokens - t)))
  if cfg.query_reduce == "mean":
    route = mask / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1)
  else:
    if cfg.query_reduce == "last":
      last = jnp.max(jnp.where(mask, jnp.arange(tokens), -1), axis=1, keepdims=True)
      mask = jnp.arange(tokens) == last
    route = jnp.where(mask, 0.0, -jnp.inf)
  route = route.astype(jnp.float32).reshape(rows * tokens // tile, 1, tile)
  chunk_doc = chunk_doc.astype(jnp.int32)
  ends = chunk_doc[block_chunks - 1::block_chunks]
  after = jnp.concatenate([chunk_doc[block_chunks::block_chunks], jnp.zeros(1, jnp.int32)])
  continues = jnp.where((ends == after) & (ends > 0), ends, 0)
  operands = Operands(queries, route, keys.reshape(c, hkv * d), key_scale, chunk_doc[:, None],
                      chunk_doc[None] if cfg.chunk_reduce == "mean" else None, continues)
  return spec, operands


def init_state(spec: Spec) -> State:
  kb = (spec.keep, spec.block_rows)
  return State(jnp.full(kb, -jnp.inf, jnp.float32), jnp.full(kb, NO_COLUMN, jnp.int32),
               jnp.zeros((1, 1), jnp.int32), jnp.full((1, spec.block_rows), -jnp.inf, jnp.float32),
               jnp.zeros((1, 1), jnp.float32), jnp.zeros((1, spec.block_rows), jnp.float32))


def no_scores(spec: Spec):
  """Chunk scores [Ct, Bb] before any token tile: the token reduction's identity."""
  empty = 0.0 if spec.query_reduce == "mean" else -jnp.inf
  return jnp.full((spec.block_chunks, spec.block_rows), empty, jnp.float32)


def add_token_tile(scores, spec: Spec, index, *, load_keys: Callable, load_scale: Callable,
                   load_queries: Callable, route):
  """Chunk scores [Ct, Bb] with token tile `index` of the request block added: its [Ct, Tt]
  scores reduced over heads, then over each of its requests' route tokens (route [1, Tt]), and
  combined into those requests' columns (max, or sum for the query mean)."""
  acc = None
  for j in range(spec.kv_heads):
    k = load_keys(j)
    if spec.scaled:
      k = k.astype(jnp.bfloat16)
    head = None
    for g in range(spec.groups):
      s = lax.dot_general(k, load_queries(j * spec.groups + g), (((1,), (1,)), ((), ())),
                          precision=lax.Precision.HIGHEST if spec.exact else None,
                          preferred_element_type=jnp.float32)
      head = s if head is None else jnp.maximum(head, s)
    if spec.scaled:
      head = head * load_scale(j)
    if acc is None:
      acc = head
    else:
      acc = acc + head if spec.head_reduce == "mean" else jnp.maximum(acc, head)
  if spec.head_reduce == "mean":
    acc = acc / spec.heads
  width = min(spec.tokens, spec.token_tile)  # a request's columns in the tile
  first = lax.div(index * jnp.int32(spec.token_tile), jnp.int32(spec.tokens))  # its first request
  token = lax.div(lax.broadcasted_iota(jnp.int32, (1, spec.token_tile), 1), jnp.int32(width))
  column = lax.broadcasted_iota(jnp.int32, (1, spec.block_rows), 1)
  for m in range(spec.token_tile // width):
    mine = token == m
    if spec.query_reduce == "mean":
      one = jnp.sum(jnp.where(mine, acc * route, 0.0), axis=1, keepdims=True)
      scores = jnp.where(column == first + m, scores + one, scores)
    else:
      one = jnp.max(jnp.where(mine, acc + route, -jnp.inf), axis=1, keepdims=True)
      scores = jnp.where(column == first + m, jnp.maximum(scores, one), scores)
  return scores


def tile_step(state: State, spec: Spec, scores, *, chunk_doc, chunk_doc_row, live,
              continues) -> State:
  """`state` after one tile of chunk scores [Ct, Bb] (`add_token_tile` over the token tiles);
  chunk_doc [Ct, 1] (and chunk_doc_row [1, Ct] for the chunk mean); live [Ct, 1]: the chunks this
  kernel counts; continues: the tile's `continues`."""
  carried = live & (chunk_doc == state.carry_doc)
  inf = jnp.zeros_like(state.carry_inf)
  count = state.carry_count
  if spec.chunk_reduce == "max":
    value = jnp.where(carried, jnp.maximum(scores, state.carry_value), scores)
    total = value  # what a held document carries: its running max
  else:
    # [Ct, Ct] same document (a document lies wholly inside or outside the chunks a kernel counts)
    same = (chunk_doc == chunk_doc_row).astype(jnp.float32)
    neg = jnp.isneginf(scores)
    dot = lambda m: jnp.dot(same, m, precision=lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
    total = dot(jnp.where(neg, 0.0, scores)) + jnp.where(carried, state.carry_value, 0.0)
    inf = dot(neg.astype(jnp.float32)) + jnp.where(carried, state.carry_inf, 0.0)
    count = jnp.sum(same, axis=1, keepdims=True) + jnp.where(carried, state.carry_count, 0.0)
    value = jnp.where(inf > 0, -jnp.inf, total / jnp.maximum(count, 1.0))
  held = live & (chunk_doc == continues) & (continues > 0)
  column = chunk_doc - 1
  slot = lax.broadcasted_iota(jnp.int32, state.values.shape, 0)

  def keep_best(_, carry):
    values, columns, open_ = carry
    best = jnp.max(jnp.where(open_, value, -jnp.inf), axis=0, keepdims=True)
    col = jnp.min(jnp.where(open_ & (value == best), column, NO_COLUMN), axis=0, keepdims=True)
    worst = jnp.min(values, axis=0, keepdims=True)
    worst_col = jnp.max(jnp.where(values == worst, columns, -1), axis=0, keepdims=True)
    wins = (col < NO_COLUMN) & ((best > worst) | ((best == worst) & (col < worst_col)))
    at = jnp.min(jnp.where((values == worst) & (columns == worst_col), slot, spec.keep), axis=0,
                 keepdims=True)
    put = wins & (slot == at)
    return (jnp.where(put, best, values), jnp.where(put, col, columns), open_ & (column != col))

  open_ = jnp.broadcast_to(live & ~held, scores.shape)
  values, columns, _ = lax.fori_loop(0, spec.keep, keep_best,
                                     (state.values, state.columns, open_))
  hold = lambda x, empty: jnp.max(jnp.where(held, x, empty), axis=0, keepdims=True)
  return State(values, columns, jnp.broadcast_to(continues, (1, 1)).astype(jnp.int32),
               hold(total, -jnp.inf), hold(count, 0.0), hold(inf, 0.0))


def merge(values, columns, batch: int, k_out: int):
  """Per-block kept documents values/columns [P, nb, K, Bb] (P partitions of the chunks) -> the
  best k_out per request, best first: (scores [B, k_out], columns [B, k_out], found [B, k_out])."""
  p, nb, keep, bb = values.shape
  flat = lambda x: jnp.transpose(x, (1, 3, 0, 2)).reshape(nb * bb, p * keep)[:batch]
  values, columns = flat(values), flat(columns)
  neg, columns = lax.sort((-values, columns), dimension=1, num_keys=2)
  values, columns = -neg[:, :k_out], columns[:, :k_out]
  found = columns < NO_COLUMN
  return values, jnp.where(found, columns, 0), found
