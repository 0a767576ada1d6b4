"""Next-token choice from last-position logits: greedy, or temperature then nucleus (top-p).

Every row draws from its own key (the caller's key folded with the row's request number and the
step), so a request's sample does not depend on which other requests share its batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def nucleus_logits(logits, top_p):
  """logits [B, V] f32 with every token outside the smallest set whose probability reaches `top_p`
  set to -inf (the most likely token always stays)."""
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
  keep_sorted = before < top_p
  keep_sorted = keep_sorted.at[:, 0].set(True)
  keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
      keep_sorted)
  return jnp.where(keep, logits, -jnp.inf)


def next_tokens(logits, *, greedy: bool, temperature, top_p, key, row_ids, step):
  """logits [B, V] -> token ids [B] int32. `greedy` is static; `temperature` and `top_p` are
  scalars (traced, so changing them does not recompile); `row_ids` [B] number the requests."""
  logits = logits.astype(jnp.float32)
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = nucleus_logits(logits / temperature, top_p)
  keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), step))(row_ids)
  return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
