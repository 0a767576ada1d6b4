"""The training objective: LM loss on the prompt stream (chunked cross-entropy, no [B, S, V] float32
logits), the auxiliary routing loss over every router layer, their weighted total, and router recall."""

from __future__ import annotations

import jax

from msa_jax.data.batch import MemoryBatch, PromptBatch
from msa_jax.model.model import MSAForCausalLM
from msa_jax.training import losses


def loss_and_metrics(params, model: MSAForCausalLM, memory: MemoryBatch, prompt: PromptBatch, *,
                     ce_chunk_size: int = 1024, lm_weight: float | None = None,
                     aux_weight: float | None = None):
  """(total loss, metrics dict). Weights default to the MSAConfig's (the paper's main phase:
  1.0·LM + 0.1·aux); the router warm-up passes lm_weight=0.1, aux_weight=1.0."""
  cfg = model.msa

  def run(module):
    out = module(prompt, memory)
    return out, module.lm_kernel()

  out, kernel = model.apply({"params": params}, method=lambda m: run(m))
  nll, count = losses.chunked_cross_entropy(out.hidden, kernel, prompt.labels, ce_chunk_size)
  lm = nll / jax.numpy.maximum(count, 1.0)
  metrics = {"lm_loss": lm, "lm_tokens": count}
  total = (cfg.lm_loss_weight if lm_weight is None else lm_weight) * lm
  if out.doc_scores is not None and cfg.router_layers:
    d = prompt.doc_labels.shape[-1]
    scores, present = out.doc_scores[..., :d], out.doc_present[..., :d]
    aux = losses.aux_loss(scores, present, prompt.doc_labels, cfg, params.get("bce_bias"))
    total = total + (cfg.aux_loss_weight if aux_weight is None else aux_weight) * aux
    metrics["aux_loss"] = aux
    recall = losses.router_recall(scores, present, prompt.doc_labels)
    metrics.update({f"{k}/layer{layer}": v[r] for k, v in recall.items()
                    for r, layer in enumerate(cfg.router_layers)})
  metrics["loss"] = total
  return total, metrics
