"""The training objective: the weighted LM terms (chunked cross-entropy, no [B, S, V] float32
logits), the auxiliary routing loss over the router layers it counts, their total, router recall.

Every prompt-stream term (`targets.prompt_labels`) is scored from one pass of prompt logits, so all
of them are logged whatever their weights. The memory LM term needs its own pass over the whole
memory stream, so it is computed (and logged) only when its weight is nonzero.
"""

from __future__ import annotations

import jax.numpy as jnp

from msa_jax.data.batch import MemoryBatch, PromptBatch
from msa_jax.model.model import MSAForCausalLM
from msa_jax.training import losses, targets


def loss_and_metrics(params, model: MSAForCausalLM, memory: MemoryBatch, prompt: PromptBatch, *,
                     ce_chunk_size: int = 1024, weights: losses.LossWeights | None = None):
  """(total loss, metrics dict: `loss`, `{term}_loss` per computed term, router recall per layer).
  `weights` default to the MSAConfig's (the paper's main phase: 1.0·LM + 0.1·aux); the router
  warm-up passes lm=0.1, aux=1.0."""
  cfg = model.msa
  weights = losses.LossWeights.of(cfg) if weights is None else weights

  def run(module):
    return module(prompt, memory), module.lm_kernel()

  out, kernel = model.apply({"params": params}, method=run)
  names, labels = zip(*targets.prompt_labels(prompt).items())
  means = losses.mean_cross_entropy(out.hidden, kernel, jnp.stack(labels), ce_chunk_size)
  terms = {name: means[i] for i, name in enumerate(names)}
  if weights.memory_lm:
    terms["memory_lm"] = losses.mean_cross_entropy(out.memory_hidden, kernel,
                                                   targets.memory_labels(memory), ce_chunk_size)
  metrics = {}
  if out.doc_scores is None:  # no router layer: nothing to route, as in the plain backbone
    terms["aux"] = jnp.zeros((), jnp.float32)
  else:
    d = prompt.doc_labels.shape[-1]
    scores, present = out.doc_scores[..., :d], out.doc_present[..., :d]
    recall = losses.router_recall(scores, present, prompt.doc_labels)
    metrics.update({f"{k}/layer{layer}": v[r] for k, v in recall.items()
                    for r, layer in enumerate(cfg.router_layers)})
    if cfg.aux_layers:  # a suffix of the router layers (those >= aux_loss_min_layer)
      counted = scores[len(cfg.router_layers) - len(cfg.aux_layers):]
      terms["aux"] = losses.aux_loss(counted, present, prompt.doc_labels, cfg,
                                     params.get("bce_bias"))
    elif weights.aux:
      raise ValueError(f"aux_loss_min_layer {cfg.aux_loss_min_layer} leaves the aux loss none of "
                       f"the router layers {cfg.router_layers}; lower it or weight aux 0")
  metrics.update({f"{name}_loss": value for name, value in terms.items()})
  total = losses.total_loss(terms, weights)
  metrics["loss"] = total
  return total, metrics
