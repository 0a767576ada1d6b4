"""The training objective: LM loss on the prompt stream (chunked cross-entropy, no [B, S, V] float32
logits), the auxiliary routing loss over every router layer, their weighted total, and router recall."""

from __future__ import annotations

import jax.numpy as jnp

from msa_jax.data.batch import MemoryBatch, PromptBatch
from msa_jax.model.model import MSAForCausalLM
from msa_jax.training import losses


def loss_and_metrics(params, model: MSAForCausalLM, memory: MemoryBatch, prompt: PromptBatch, *,
                     ce_chunk_size: int = 1024, lm_weight: float | None = None,
                     aux_weight: float | None = None):
  """(total loss, metrics dict). Weights default to the MSAConfig's (the paper's main phase:
  1.0·LM + 0.1·aux); the router warm-up passes lm_weight=0.1, aux_weight=1.0."""
  overrides = {"lm_loss_weight": lm_weight, "aux_loss_weight": aux_weight}
  cfg = model.msa.replace(**{k: v for k, v in overrides.items() if v is not None})

  def run(module):
    return module(prompt, memory), module.lm_kernel()

  out, kernel = model.apply({"params": params}, method=run)
  lm = losses.mean_cross_entropy(out.hidden, kernel, prompt.labels, ce_chunk_size)
  metrics = {"lm_loss": lm}
  aux = jnp.zeros((), jnp.float32)
  if out.doc_scores is not None and cfg.router_layers:
    d = prompt.doc_labels.shape[-1]
    scores, present = out.doc_scores[..., :d], out.doc_present[..., :d]
    aux = losses.aux_loss(scores, present, prompt.doc_labels, cfg, params.get("bce_bias"))
    metrics["aux_loss"] = aux
    recall = losses.router_recall(scores, present, prompt.doc_labels)
    metrics.update({f"{k}/layer{layer}": v[r] for k, v in recall.items()
                    for r, layer in enumerate(cfg.router_layers)})
  total = losses.total_loss(lm, aux, cfg=cfg)
  metrics["loss"] = total
  return total, metrics
