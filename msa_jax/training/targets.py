"""What each LM loss term predicts: shifted label arrays (-1 = none) derived in-graph from a batch.

All are next-token targets, placed like `PromptBatch.labels`: the label at position p is the token
at p + 1. The prompt's official LM labels come with the batch; the others are selected by the
batch's markers (`answer_mask`, `context_mask`), by its template head (`sees_memory`) or, in the
memory stream, by its documents (`segment_ids`): a batch carries two bool masks, not label arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from msa_jax.data.batch import MemoryBatch, PromptBatch


def _next_tokens(tokens: jax.Array, where: jax.Array) -> jax.Array:
  """tokens[:, p + 1] where `where[:, p]`, else -1 (the last column predicts nothing)."""
  nxt = jnp.concatenate([tokens[:, 1:], jnp.full_like(tokens[:, :1], -1)], axis=1)
  return jnp.where(where, nxt, -1).astype(jnp.int32)


def _shift_left(mask: jax.Array) -> jax.Array:
  """mask[:, p + 1] at p: "the next token is marked"."""
  return jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)


def prompt_labels(prompt: PromptBatch) -> dict[str, jax.Array]:
  """[B, S_q] labels of the prompt-stream terms, by term name (`losses.LossWeights`):
  lm: the batch's labels; answer: those on the final answer's value; context_lm: the retrieved
  text injected in the context; prompt_dense: every real token after the template head (the first
  question token is predicted from the head's last)."""
  after_head = _shift_left(prompt.sees_memory & (prompt.segment_ids > 0))
  return {"lm": prompt.labels,
          "answer": jnp.where(prompt.answer_mask, prompt.labels, -1),
          "context_lm": _next_tokens(prompt.tokens, prompt.context_mask),
          "prompt_dense": _next_tokens(prompt.tokens, after_head)}


def memory_labels(memory: MemoryBatch) -> jax.Array:
  """[B, S_mem] labels of the memory LM term: each document token after a document's first,
  predicted from the token before it in the same document (never across documents or padding)."""
  seg = memory.segment_ids
  same_doc = (seg > 0) & (_shift_left(seg) == seg)
  return _next_tokens(memory.tokens, same_doc)
