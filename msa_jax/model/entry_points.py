"""The callers of the one MSA layer implementation as functions of (model, params), for `jax.jit`
with the model static (DESIGN.md):

1. `forward`: training, both streams in one program; each router layer routes over the pooled chunks of
   this batch's own memory stream.
2. `encode_memory` (stage 1): memory stream only -> `EncodedMemory` (a `MemoryView` of per router
   layer K̄, V̄, k̄_r and the chunk -> document map, plus the template head's K/V in every layer).
3. `prefill` (stage 2): prompt stream only, routing over a memory view (an encoded `MemoryView` or a
   memory bank's view).
Decoding (stage 3) is `MSAForCausalLM.decode_step`, driven by `msa_jax.inference.engine`.
"""

from __future__ import annotations

from msa_jax.data.batch import MemoryBatch, PromptBatch
from msa_jax.model.model import EncodedMemory, ForwardOutput, MSAForCausalLM, PrefillOutput


def forward(model: MSAForCausalLM, params, memory: MemoryBatch, prompt: PromptBatch
            ) -> ForwardOutput:
  return model.apply({"params": params}, prompt, memory)


def encode_memory(model: MSAForCausalLM, params, memory: MemoryBatch, template_tokens
                  ) -> EncodedMemory:
  """Encodes documents (the memory stream) and the template head (positions 0..T-1, no memory)."""
  return model.apply({"params": params}, memory, template_tokens, method=MSAForCausalLM.encode)


def prefill(model: MSAForCausalLM, params, prompt: PromptBatch, view, *,
            document_scores: bool = False) -> tuple[object, PrefillOutput]:
  """(logits [B, S_q, V], PrefillOutput) of the prompt stream routed over `view`;
  `document_scores` (static under jit) keeps every document's score (`MSAForCausalLM.prefill`)."""
  return model.apply({"params": params}, prompt, view, document_scores,
                     method=MSAForCausalLM.prefill_logits)
