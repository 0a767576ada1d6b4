"""`MSAForCausalLM`: the Qwen3 decoder with Memory Sparse Attention over two streams.

Layers are grouped into *blocks*: maximal runs of consecutive layers of the same kind (router layer or
not). With `scan_layers` each block is one `nn.scan` with stacked parameters (`block_{a}_{b}` holds
layers a..b-1 along a leading `layers` axis); otherwise each layer is its own module `layers_{i}`.
`msa_jax.model.param_layout` converts between the two parameter layouts.

Each caller has its own method and typed output (DESIGN.md): `__call__` the training forward
(`ForwardOutput`), `encode` (`EncodedMemory`), `prefill` (`PrefillOutput`), `decode_step`
(`DecodeOutput`). `logits` and `lm_kernel` give the LM head, which losses apply chunk by chunk (no
[B, S, V] float32 tensor). `msa_jax.model.entry_points` wraps them as functions of (model, params).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from msa_jax.config import ModelConfig, MSAConfig
from msa_jax.data.batch import plain_prompt
from msa_jax.model.layer import MSADecoderLayer
from msa_jax.model.layers import RMSNorm, dtype_of, embedding_lookup
from msa_jax.model.memory_view import MemoryView

# the layer methods a scanned block runs
_SCANNED_METHODS = ["__call__", "encode", "prefill", "scored_prefill"]

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute everything
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def layer_blocks(num_layers: int, router_layers) -> list[tuple[int, int, bool]]:
  """Maximal runs [start, end) of consecutive layers of the same kind: (start, end, is_router)."""
  router = set(router_layers)
  blocks = []
  for i in range(num_layers):
    kind = i in router
    if blocks and blocks[-1][2] == kind:
      blocks[-1] = (blocks[-1][0], i + 1, kind)
    else:
      blocks.append((i, i + 1, kind))
  return blocks


@flax.struct.dataclass
class ForwardOutput:
  """Training forward. hidden [B,S_q,E]: final-normed prompt states; memory_hidden [B,S_mem,E]:
  final-normed memory-stream states (None without a memory stream; the memory LM loss reads them,
  anything else leaves them to dead-code elimination); per router layer, stacked in
  `router_layers` order: `selection` (a `router.Selection`, [L_r,B,k], as prefill's) and, for the
  aux loss and router recall, every document's score doc_scores [L_r,B,C] f32 with doc_present
  [B,C] (column d-1 = document d; C = chunk slots, an upper bound on documents per row). The
  routing fields are None without a memory stream or router layers."""

  hidden: jax.Array
  memory_hidden: jax.Array | None
  selection: Any
  doc_scores: jax.Array | None
  doc_present: jax.Array | None


@flax.struct.dataclass
class EncodedMemory:
  """Stage 1: `view` (per router layer K̄, V̄, k̄_r and the chunk -> document map) for prefill;
  `template_kv[i] = (k, v)` [1, T, Hkv, D]: the template head's post-RoPE K/V in layer i."""

  view: MemoryView
  template_kv: list


@flax.struct.dataclass
class PrefillOutput:
  """Stage 2. hidden [B,S_q,E] final-normed; `selection`: the view's `router.Selection` per router
  layer, best first, stacked to [L_r, B, k] (None without a view or router layers); `kv[i] = (k, v, seg, idx)`:
  every key layer i's prompt attended (gathered chunks, then the prompt), to seed a decode cache;
  with `document_scores`, doc_scores [L_r,B,C] / doc_present [B,C] as the training forward's."""

  hidden: jax.Array
  selection: Any
  kv: list
  doc_scores: jax.Array | None = None
  doc_present: jax.Array | None = None


@flax.struct.dataclass
class DecodeOutput:
  """Stage 3: hidden [B,n,E] of the appended tokens, final-normed; `caches`: the updated layer caches."""

  hidden: jax.Array
  caches: list


class MSAForCausalLM(nn.Module):
  """One method per caller, each with its own output: `__call__` (training forward), `encode`,
  `prefill`, `decode_step`; `prompt_logits` / `prefill_logits` add the LM head for small shapes."""

  config: ModelConfig
  msa: MSAConfig
  attention_impl: str = "auto"  # segment_attention.api: by backend, blockwise on CPU

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(
        c.vocab_size, c.hidden_size, dtype=dtype_of(c.compute_dtype),
        param_dtype=dtype_of(c.param_dtype),
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(c.initializer_range if c.embedding_init_std is None
                                   else c.embedding_init_std), ("vocab", "embed")))
    layer_cls = MSADecoderLayer
    if c.remat_policy != "none":
      layer_cls = nn.remat(MSADecoderLayer, policy=_REMAT_POLICIES[c.remat_policy],
                           prevent_cse=not c.scan_layers, methods=_SCANNED_METHODS)
    blocks = layer_blocks(c.num_layers, self.msa.router_layers)
    if c.scan_layers:  # attribute-container names: block_{a}_{b}
      self.block = {f"{a}_{b}": nn.scan(
          layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, 0), length=b - a, methods=_SCANNED_METHODS,
          metadata_params={nn.PARTITION_NAME: "layers"})(
              c, self.msa, is_router, attention_impl=self.attention_impl)
                    for a, b, is_router in blocks}
    else:  # layers_{i}
      router = set(self.msa.router_layers)
      self.layers = [layer_cls(c, self.msa, i in router, attention_impl=self.attention_impl)
                     for i in range(c.num_layers)]
    self.final_norm = RMSNorm(c.rms_norm_eps, c.param_dtype)
    if self.msa.aux_loss_method == "BCE":  # the BCE aux loss's learnable bias (official `b`)
      self.bce_bias = self.param("bce_bias", nn.with_logical_partitioning(
          nn.initializers.constant(self.msa.bce_bias_init), ()), (), jnp.float32)
    if not c.tie_word_embeddings:
      self.lm_head = self.param("lm_head", nn.with_logical_partitioning(
          nn.initializers.normal(c.initializer_range), ("embed", "vocab")),
          (c.hidden_size, c.vocab_size), dtype_of(c.param_dtype))

  def _embed(self, tokens):
    """`nn.Embed`'s values (a table row cast to the compute dtype), with a float32 gradient sum
    (`embedding_lookup`)."""
    x = embedding_lookup(self.embed_tokens.embedding, tokens)
    x = x.astype(dtype_of(self.config.compute_dtype))
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

  def _run_layers(self, method: str, carry, batch, view=None):
    """Runs layer method `method` over every layer (a scanned block at a time with `scan_layers`);
    router layers get their slice of `view` as xs. Returns (carry, per-layer outputs by index)."""
    c = self.config
    per_layer = {}
    for start, end, is_router in layer_blocks(c.num_layers, self.msa.router_layers):
      if c.scan_layers:
        xs = view.span(start, end) if (view is not None and is_router) else None
        with jax.named_scope(f"block_{start}_{end}"):
          carry, ys = getattr(self.block[f"{start}_{end}"], method)(carry, batch, xs)
        for i in range(start, end):
          per_layer[i] = jax.tree.map(lambda y, j=i - start: y[j], ys)
      else:
        for i in range(start, end):
          xs = view.at(i) if (view is not None and is_router) else None
          with jax.named_scope(f"layer_{i}"):
            carry, per_layer[i] = getattr(self.layers[i], method)(carry, batch, xs)
    return carry, per_layer

  def _stack_routers(self, per_layer):
    """Per-router-layer outputs stacked on a leading [L_r] axis (None when there are none)."""
    found = [per_layer[i] for i in self.msa.router_layers if per_layer[i] is not None]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *found) if found else None

  def __call__(self, prompt, memory=None) -> ForwardOutput:
    """Training forward: both streams in one program; each router layer routes the prompt over
    the pooled chunks of this batch's own memory stream (None: an empty memory, the backbone)."""
    streams = (None if memory is None else self._embed(memory.tokens), self._embed(prompt.tokens))
    (x_mem, x_prompt), per_layer = self._run_layers("__call__", streams, (memory, prompt))
    routed = self._stack_routers(per_layer)
    selection, doc = (None, None) if routed is None else routed
    return ForwardOutput(
        hidden=self.final_norm(x_prompt),
        memory_hidden=None if x_mem is None else self.final_norm(x_mem),
        selection=selection, doc_scores=None if doc is None else doc.scores,
        doc_present=None if doc is None else doc.present[0])

  def encode(self, memory, template_tokens) -> EncodedMemory:
    """Stage 1: documents (the memory stream) and the template head (positions 0..T-1, no memory)."""
    _, pooled = self._run_layers("encode", self._embed(memory.tokens), memory)
    view = MemoryView(self._stack_routers(pooled), self.msa.router_layers)
    template = plain_prompt(jnp.asarray(template_tokens)[None])
    _, per_layer = self._run_layers("prefill", self._embed(template.tokens), template)
    return EncodedMemory(view, [per_layer[i].kv[:2] for i in range(self.config.num_layers)])

  def prefill(self, prompt, view=None, document_scores: bool = False) -> PrefillOutput:
    """Stage 2: the prompt stream routed over `view` (an encoded `MemoryView`, a bank's view, any
    object with the route/gather protocol; None: no memory, router layers attend to the prompt).
    `document_scores` also keeps every document's score (views with `score_documents`: the
    in-memory ones), for comparisons with the training forward."""
    method = "scored_prefill" if document_scores else "prefill"
    x, per_layer = self._run_layers(method, self._embed(prompt.tokens), prompt, view)
    doc = None
    if document_scores:
      doc = self._stack_routers({i: per_layer[i][1] for i in per_layer})
      per_layer = {i: per_layer[i][0] for i in per_layer}
    selection = self._stack_routers({i: per_layer[i].selection for i in per_layer})
    return PrefillOutput(self.final_norm(x), selection,
                         [per_layer[i].kv for i in range(self.config.num_layers)],
                         doc_scores=None if doc is None else doc.scores,
                         doc_present=None if doc is None else doc.present[0])

  def decode_step(self, prompt, caches) -> DecodeOutput:
    """Stage 3: appends the prompt's tokens to `caches` (one `kv_cache.LayerCache` per layer, from a
    prefill) and attends over them; memory is not routed again. Per-layer layout only."""
    if self.config.scan_layers:
      raise ValueError("decode_step runs in the per-layer layout (scan_layers=False)")
    x = self._embed(prompt.tokens)
    new = []
    for i, (layer, cache) in enumerate(zip(self.layers, caches)):
      with jax.named_scope(f"layer_{i}"):
        x, cache = layer.decode(x, prompt, cache)
      new.append(cache)
    return DecodeOutput(self.final_norm(x), new)

  def prompt_logits(self, prompt, memory=None):
    """(logits [B, S_q, V] in the compute dtype, ForwardOutput) of the training forward: for
    inference and small shapes; training applies `lm_kernel` chunk by chunk instead."""
    out = self(prompt, memory)
    return self.logits(out.hidden), out

  def prefill_logits(self, prompt, view=None, document_scores: bool = False):
    """(logits [B, S_q, V], PrefillOutput) of `prefill`."""
    out = self.prefill(prompt, view, document_scores)
    return self.logits(out.hidden), out

  def lm_kernel(self):
    """The LM head as an [E, V] matrix in the compute dtype (the embedding when tied)."""
    c = self.config
    kernel = self.embed_tokens.embedding.T if c.tie_word_embeddings else self.lm_head
    return kernel.astype(c.compute_dtype)

  def logits(self, hidden):
    out = jnp.dot(hidden.astype(self.config.compute_dtype), self.lm_kernel())
    return nn.with_logical_constraint(out, ("batch", "length", "act_vocab"))
