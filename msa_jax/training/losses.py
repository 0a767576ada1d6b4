"""Training losses: chunked LM cross-entropy, the router's auxiliary loss, router recall and the
weighted total.

Pure jax.numpy with static shapes and float32 math, so all of it runs inside a jitted train step
(MSA_REFERENCE_IMPL.md §2.7, MSA_PAPER.md §2.2).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from msa_jax.config import MSAConfig
from msa_jax.model import router

TEMPERATURE_RANGE = (0.001, 0.5)
RECALL_AT = (1, 5, 10, 16)


# --------------------------------------------------------------------------- LM cross-entropy


def _chunk_nll(hidden, lm_kernel, labels):
  """Summed NLL and token count of one chunk per label set (labels [K, B, c]); its [B, c, V]
  logits and their logsumexp serve every label set and live only inside this call."""
  logits = jnp.einsum("bce,ev->bcv", hidden, lm_kernel, preferred_element_type=jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  nll, count = [], []
  for k in range(labels.shape[0]):  # K is small and static; one gather each
    valid = labels[k] >= 0
    target = jnp.take_along_axis(logits, jnp.where(valid, labels[k], 0)[..., None], axis=-1)[..., 0]
    nll.append(jnp.sum(jnp.where(valid, lse - target, 0.0)))
    count.append(jnp.sum(valid, dtype=jnp.float32))
  return jnp.stack(nll), jnp.stack(count)


def chunked_cross_entropy(hidden: jax.Array, lm_kernel: jax.Array, labels: jax.Array,
                          chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """Summed next-token NLL and the number of scored tokens, without [B, S, V] logits.

  hidden [B, S, E] and lm_kernel [E, V] are in compute dtype (tied embeddings: pass embedding.T);
  labels [B, S] are already shifted, negative = ignored. labels [K, B, S] score K label sets
  against one pass of logits (the sums are then [K]). A scan walks chunks of `chunk_size`
  positions; each chunk's body is rematerialised, so the backward pass also holds one chunk's
  logits at a time. Logits accumulate in float32.
  """
  b, s, e = hidden.shape
  stacked = labels.reshape((-1, b, s))
  k = stacked.shape[0]
  chunk = max(1, min(int(chunk_size), s))
  n = -(-s // chunk)
  pad = n * chunk - s
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  stacked = jnp.pad(stacked.astype(jnp.int32), ((0, 0), (0, 0), (0, pad)), constant_values=-1)
  xs = (hidden.reshape(b, n, chunk, e).swapaxes(0, 1),
        stacked.reshape(k, b, n, chunk).transpose(2, 0, 1, 3))
  body = jax.checkpoint(_chunk_nll)

  def step(carry, x):
    nll, count = body(x[0], lm_kernel, x[1])
    return (carry[0] + nll, carry[1] + count), None

  zero = jnp.zeros((k,), jnp.float32)
  (nll, count), _ = jax.lax.scan(step, (zero, zero), xs)
  return nll.reshape(labels.shape[:-2]), count.reshape(labels.shape[:-2])


def mean_cross_entropy(hidden: jax.Array, lm_kernel: jax.Array, labels: jax.Array,
                       chunk_size: int) -> jax.Array:
  """Token-mean NLL (per label set for labels [K, B, S]); 0 when no label is scored."""
  nll, count = chunked_cross_entropy(hidden, lm_kernel, labels, chunk_size)
  return nll / jnp.maximum(count, 1.0)


# --------------------------------------------------------------------------- router auxiliary loss


def clamped_temperature(cfg: MSAConfig) -> float:
  """The official code clamps τ to [0.001, 0.5] before every use."""
  lo, hi = TEMPERATURE_RANGE
  return min(max(float(cfg.temperature), lo), hi)


def _masked_logsumexp(z, mask):
  """log Σ_mask exp(z) over the last axis; 0 for an empty mask (such rows are dropped later).

  Masked entries pass through exp as -inf, so they get exactly zero gradient, never 0·inf.
  """
  m = jnp.max(jnp.where(mask, z, -jnp.inf), axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  total = jnp.sum(jnp.exp(jnp.where(mask, z - m, -jnp.inf)), axis=-1)
  some = jnp.any(mask, axis=-1)
  return jnp.where(some, jnp.log(jnp.where(some, total, 1.0)) + m[..., 0], 0.0)


def _focal_weight(one_minus_p, gamma):
  """(1-p)^γ with a finite gradient at 1-p = 0, whatever γ ≥ 0 is."""
  q = jnp.maximum(one_minus_p, 0.0)
  at_zero = 1.0 if gamma == 0 else 0.0
  return jnp.where(q > 0, jnp.power(jnp.where(q > 0, q, 1.0), gamma), at_zero)


def _infonce(z, present, pos, gamma):
  """Σ_pos -(1-p_i)^γ log p_i with p = softmax over the present docs (γ = 0: plain InfoNCE)."""
  logp = z - _masked_logsumexp(z, present)[..., None]
  weight = 1.0 if gamma is None else _focal_weight(-jnp.expm1(logp), gamma)
  return -jnp.sum(jnp.where(pos, weight * logp, 0.0), axis=-1)


def _decoupled(z, pos, neg, gamma):
  """Paper Eq. 5: Σ_pos -log p_i, p_i = e^{z_i} / (e^{z_i} + Σ_neg e^{z_j}), optionally focal.

  -log p_i = softplus(lse_neg - z_i) and log(1 - p_i) = -softplus(z_i - lse_neg) are exact and
  stable at any τ. With no negative p_i = 1, so the row contributes 0.
  """
  lse_neg = _masked_logsumexp(z, neg)[..., None]
  nll = jax.nn.softplus(lse_neg - z)
  if gamma is not None:
    nll = jnp.exp(-gamma * jax.nn.softplus(z - lse_neg)) * nll
  has_neg = jnp.any(neg, axis=-1, keepdims=True)
  return jnp.sum(jnp.where(pos & has_neg, nll, 0.0), axis=-1)


def _bce(scores, present, pos, bias):
  """Mean over present docs of -logsigmoid((s + b)·y), y = +1 for positives and -1 otherwise."""
  y = jnp.where(pos, 1.0, -1.0)
  terms = jnp.where(present, jax.nn.log_sigmoid((scores + bias) * y), 0.0)
  return -jnp.sum(terms, axis=-1) / jnp.maximum(jnp.sum(present, axis=-1), 1)


def aux_loss(doc_scores: jax.Array, doc_present: jax.Array, doc_labels: jax.Array, cfg: MSAConfig,
             bce_bias: jax.Array | float | None = None) -> jax.Array:
  """Router loss `cfg.aux_loss_method`, averaged over (router layer, sample) pairs.

  doc_scores [L, B, D] are document scores per router layer, doc_present [B, D] marks the row's
  real documents and doc_labels [B, D] the positives (multi-hot). Absent documents enter no sum and
  get zero gradient whatever their score (-inf included). A pair with no present positive is left
  out of the average (the official code would count it as a 0, or crash in its recall); with no
  valid pair the loss is 0. τ = cfg.temperature clamped to [0.001, 0.5].

  INFONCE_FOCAL weights -log p_i by (1-p_i)^γ with p the softmax over all present docs, as the
  official code does (there γ is fixed at 2). INFONCE_DECOUPLE_FOCAL uses the decoupled p_i of
  Eq. 5 and γ = cfg.focal_gamma; the official code passes the positive count as γ, a bug we do not
  reproduce. Focal weights are not detached, as in the official code. BCE uses `bce_bias` (the
  caller's learnable scalar; None = cfg.bce_bias_init) and no temperature.
  """
  scores = doc_scores.astype(jnp.float32)
  present = jnp.broadcast_to(doc_present.astype(bool), scores.shape)
  pos = present & (jnp.broadcast_to(doc_labels, scores.shape) > 0)
  safe = jnp.where(present, scores, 0.0)
  num_pos = jnp.sum(pos, axis=-1).astype(jnp.float32)
  method = cfg.aux_loss_method
  if method == "BCE":
    bias = cfg.bce_bias_init if bce_bias is None else jnp.asarray(bce_bias, jnp.float32)
    per_pair = _bce(safe, present, pos, bias)
  else:
    z = safe / clamped_temperature(cfg)
    gamma = float(cfg.focal_gamma) if method.endswith("FOCAL") else None
    if method.startswith("INFONCE_DECOUPLE"):
      summed = _decoupled(z, pos, present & ~pos, gamma)
    else:
      summed = _infonce(z, present, pos, gamma)
    per_pair = summed / jnp.maximum(num_pos, 1.0)
  valid = num_pos > 0
  return jnp.sum(jnp.where(valid, per_pair, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


# --------------------------------------------------------------------------- router recall


def router_recall(doc_scores: jax.Array, doc_present: jax.Array, doc_labels: jax.Array,
                  ns: Sequence[int] = RECALL_AT, per_sample: bool = False
                  ) -> dict[str, jax.Array]:
  """Per router layer recall@n = |top-n present docs ∩ positives| / min(#pos, n), f32[L] each
  (f32[L, B] with `per_sample`, 0 for a sample without positives).

  Averaged over the samples with at least one present positive (0 if there is none). The official
  code divides by min(#pos, 10) for every n, clips n to the row's doc count and names the key by
  the clipped n, and pools all layers. Ours equals it at n = 10; for n < 10 it differs only when
  #pos > n, where the official value cannot reach 1. Keys here are always "recall@{n}".
  """
  scores = doc_scores.astype(jnp.float32)
  present = jnp.broadcast_to(doc_present.astype(bool), scores.shape)
  positives = present & (jnp.broadcast_to(doc_labels, scores.shape) > 0)
  top = router.select_top_k(router.DocumentScores(scores, present), max(ns))
  return selection_recall(top, positives, ns, per_sample)


def selection_recall(selection: router.Selection, positives: jax.Array,
                     ns: Sequence[int] = RECALL_AT, per_sample: bool = False
                     ) -> dict[str, jax.Array]:
  """`router_recall` from a best-first selection ([..., B, k]) and the positive documents
  `positives` [..., B, D] bool (present ones only): recall@n counts the first min(n, k) picks."""
  k = selection.doc_index.shape[-1]
  positives = jnp.broadcast_to(positives, selection.doc_index.shape[:-1] + positives.shape[-1:])
  picked = jnp.take_along_axis(positives, jnp.maximum(selection.doc_index, 0), axis=-1)
  hits = jnp.cumsum(picked & selection.valid, axis=-1, dtype=jnp.float32)
  num_pos = jnp.sum(positives, axis=-1).astype(jnp.float32)
  valid = num_pos > 0
  samples = jnp.maximum(jnp.sum(valid, axis=-1), 1)
  out = {}
  for n in ns:
    recall = jnp.where(valid, hits[..., min(n, k) - 1] / jnp.maximum(jnp.minimum(num_pos, n), 1.0),
                       0.0)
    out[f"recall@{n}"] = recall if per_sample else jnp.sum(recall, axis=-1) / samples
  return out


# --------------------------------------------------------------------------- total


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """The weight of each term of the objective; a term weighted 0 is left out of the total.

  lm, aux, answer: the official terms (prompt LM over the labels, router aux loss, CE over the final
  answer's value tokens). rec: the official "reconstruction" term, CE against separate
  reconstruction labels whose content neither the paper nor the released code defines (weight 0
  there); our batches have no such labels, so any other weight is refused. Its likely meaning, an
  LM loss on the documents, is `memory_lm`. Our training-signal options, 0 = off: memory_lm (dense
  next-token loss within each memory-stream document), context_lm (dense next-token loss on the
  retrieved text injected in the prompt), prompt_dense (dense next-token loss on every prompt token
  after the template head).
  """

  lm: float = 1.0
  aux: float = 0.1
  answer: float = 0.0
  rec: float = 0.0
  memory_lm: float = 0.0
  context_lm: float = 0.0
  prompt_dense: float = 0.0

  def __post_init__(self):
    if self.rec != 0:
      raise ValueError(f"rec_loss_weight {self.rec:g}: the official reconstruction labels are "
                       f"undefined and our batches have none; set MSAConfig.rec_loss_weight to 0 "
                       f"(model.msa_overrides; the documents' LM loss is memory_lm_weight)")
    negative = {k: v for k, v in dataclasses.asdict(self).items() if v < 0}
    if negative:
      raise ValueError(f"loss weights must be >= 0, got {negative}")

  @classmethod
  def of(cls, cfg: MSAConfig, **overrides: float | None) -> "LossWeights":
    """The MSAConfig's official weights, with `overrides` that are not None."""
    weights = cls(lm=cfg.lm_loss_weight, aux=cfg.aux_loss_weight, answer=cfg.answer_loss_weight,
                  rec=cfg.rec_loss_weight)
    return dataclasses.replace(weights, **{k: v for k, v in overrides.items() if v is not None})

  def active(self) -> dict[str, float]:
    """The terms with a nonzero weight, by name."""
    return {k: v for k, v in dataclasses.asdict(self).items() if v}

  def __str__(self) -> str:
    return " + ".join(f"{w:g}*{name}" for name, w in self.active().items()) or "0"


def total_loss(terms: Mapping[str, jax.Array], weights: LossWeights) -> jax.Array:
  """Σ weight·term over the terms with a nonzero weight (each of them must be in `terms`)."""
  active = weights.active()
  missing = sorted(set(active) - set(terms))
  if missing:
    raise ValueError(f"loss terms {missing} have nonzero weights but were not computed")
  return sum((w * terms[name] for name, w in active.items()), jnp.zeros((), jnp.float32))
