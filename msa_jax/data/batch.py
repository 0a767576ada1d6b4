"""The two static-shape streams of an MSA batch (DESIGN.md "two streams, static shapes").

`MemoryBatch` holds documents packed into rows; `PromptBatch` holds the active context (template head,
question, answer). Both are pytrees of arrays so they pass through `jax.jit` unchanged; shapes are
static per bucket, so a second batch of the same bucket never recompiles.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class MemoryBatch:
  """Documents packed into rows.

  tokens      [B, S_mem] int32   token ids (padding: any id, e.g. pad)
  segment_ids [B, S_mem] int32   1..n: the document (its id within the row, in row order); 0 = padding
  positions   [B, S_mem] int32   restart at 0 in every document (document-wise RoPE)
  chunk_ids   [B, S_mem] int32   the token's chunk slot 0..C_max-1 (ragged chunks of P tokens inside
                                 its document, numbered in row order); C_max for padding (dropped)
  chunk_doc   [B, C_max] int32   the document id of each chunk slot; 0 = empty slot
  chunk_len   [B, C_max] int32   tokens in each chunk slot (the last chunk of a document is shorter)
  """

  tokens: jax.Array
  segment_ids: jax.Array
  positions: jax.Array
  chunk_ids: jax.Array
  chunk_doc: jax.Array
  chunk_len: jax.Array

  @property
  def num_chunk_slots(self) -> int:
    return self.chunk_doc.shape[-1]


@flax.struct.dataclass
class PromptBatch:
  """The active context of each sample.

  tokens      [B, S_q] int32   template head, question, template tail, answer (right-padded)
  segment_ids [B, S_q] int32   1 = token, 0 = padding
  positions   [B, S_q] int32   template head 0..T-1, then from `MSAConfig.question_position` on
  route_mask  [B, S_q] bool    tokens whose router queries score the memory (the question)
  sees_memory [B, S_q] bool    false exactly for the template head (and padding): a prefix of the
                               row is memory-blind, every later token sees the selected chunks
  labels      [B, S_q] int32   the token to predict *at* each position (already shifted); -1 = none
  doc_labels  [B, D_max] int32 multi-hot positives for the aux loss: column d-1 is document d of the
                               sample's memory row
  answer_mask [B, S_q] bool    aligned with labels: the label is a token of the final answer's value
                               (the answer loss's targets)
  context_mask [B, S_q] bool   the next token is retrieved text injected in the context (the
                               context LM loss's targets; they carry no label)
  """

  tokens: jax.Array
  segment_ids: jax.Array
  positions: jax.Array
  route_mask: jax.Array
  sees_memory: jax.Array
  labels: jax.Array
  doc_labels: jax.Array
  answer_mask: jax.Array
  context_mask: jax.Array


def inference_prompt(tokens, segment_ids, positions, route_mask, sees_memory) -> PromptBatch:
  """A prompt without training targets (no labels, no aux positives)."""
  tokens = jnp.asarray(tokens, jnp.int32)
  b, s = tokens.shape
  false = jnp.zeros((b, s), bool)
  return PromptBatch(tokens=tokens, segment_ids=jnp.asarray(segment_ids, jnp.int32),
                     positions=jnp.asarray(positions, jnp.int32),
                     route_mask=jnp.asarray(route_mask, bool),
                     sees_memory=jnp.asarray(sees_memory, bool),
                     labels=jnp.full((b, s), -1, jnp.int32),
                     doc_labels=jnp.zeros((b, 0), jnp.int32), answer_mask=false, context_mask=false)


def plain_prompt(tokens, positions=None, segment_ids=None) -> PromptBatch:
  """A prompt with no memory and no routing: the model is then exactly the Qwen3 backbone.
  `positions` default to 0..S-1 and `segment_ids` (1 = token, 0 = padding) to all ones."""
  tokens = jnp.asarray(tokens, jnp.int32)
  b, s = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  if segment_ids is None:
    segment_ids = jnp.ones((b, s), jnp.int32)
  false = jnp.zeros((b, s), bool)
  return inference_prompt(tokens, segment_ids, positions, false, false)
