"""The three callers of the one MSA layer implementation (DESIGN.md):

1. `forward`: training, both streams in one program; each router layer routes over the pooled chunks of
   this batch's own memory stream.
2. `encode_memory` (stage 1): memory stream only -> a `MemoryView` (per router layer K̄, V̄, k̄_r and the
   chunk -> document map) plus the template head's K/V in every layer.
3. `prefill` (stage 2): prompt stream only, routing over a memory view (`MemoryView` here, the memory
   bank later).
"""

from __future__ import annotations

import flax.struct
import jax

from msa_jax.data.batch import MemoryBatch, PromptBatch, plain_prompt
from msa_jax.model.memory_view import MemoryView
from msa_jax.model.model import MSAForCausalLM, MSAOutput


@flax.struct.dataclass
class EncodedMemory:
  """Stage-1 output: `view` for prefill; `template_kv[i] = (k, v)` [1, T, Hkv, D] of layer i."""

  view: MemoryView
  template_kv: list


def forward(model: MSAForCausalLM, params, memory: MemoryBatch, prompt: PromptBatch) -> MSAOutput:
  return model.apply({"params": params}, prompt, memory)


def encode_memory(model: MSAForCausalLM, params, memory: MemoryBatch, template_tokens
                  ) -> EncodedMemory:
  """Encodes documents (the memory stream) and the template head (positions 0..T-1, no memory)."""
  pooled = model.clone(collect=("pooled",)).apply({"params": params}, None, memory)
  template = plain_prompt(jax.numpy.asarray(template_tokens)[None])
  kv = model.clone(collect=("prompt_kv",)).apply({"params": params}, template)
  return EncodedMemory(pooled.extras["pooled"], kv.extras["prompt_kv"])


def prefill(model: MSAForCausalLM, params, prompt: PromptBatch, view: MemoryView):
  """(logits [B, S_q, V], MSAOutput) of the prompt stream routed over `view`."""
  return model.apply({"params": params}, prompt, None, view, method=MSAForCausalLM.prompt_logits)
