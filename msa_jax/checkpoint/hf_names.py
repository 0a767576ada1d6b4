"""The name and layout map between Hugging Face tensors and msa_jax parameters.

HF linear weights are torch `[out, in]`; ours are `in_shape + out_shape` (e.g. q_proj `[embed, heads,
head_dim]`), so a linear weight converts by a transpose and a reshape. Norm scales and the embedding
table copy unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from msa_jax.config import ModelConfig

# Scalars of the official MSAForCausalLM that are loss state, not model weights: kept verbatim so a
# round trip is bit-identical, never used by the forward.
LOSS_SCALARS = ("temperature", "b")
ROUTER_NAME = re.compile(r"model\.layers\.(\d+)\.self_attn\.router_[qk]_proj\.0\.weight$")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  hf_name: str
  path: tuple[str, ...]       # path in our per-layer parameter tree
  shape: tuple[int, ...]      # our shape
  linear_in_dims: int | None  # None: copied unchanged; else number of leading input dims of ours

  @property
  def hf_shape(self) -> tuple[int, ...]:
    if self.linear_in_dims is None:
      return self.shape
    n = self.linear_in_dims
    return (math.prod(self.shape[n:]), math.prod(self.shape[:n]))

  def to_ours(self, w: np.ndarray) -> np.ndarray:
    if self.linear_in_dims is None:
      return w
    return np.ascontiguousarray(w.T).reshape(self.shape)

  def to_hf(self, w: np.ndarray) -> np.ndarray:
    if self.linear_in_dims is None:
      return np.asarray(w)
    n = self.linear_in_dims
    return np.ascontiguousarray(np.asarray(w).reshape(math.prod(self.shape[:n]), -1).T)


def tensor_specs(cfg: ModelConfig, router_layers=()) -> list[TensorSpec]:
  """Every tensor of a Qwen3 (plus router projections in `router_layers`) in HF order."""
  e, h, kv, d, m, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                       cfg.intermediate_size, cfg.vocab_size)
  specs = [TensorSpec("model.embed_tokens.weight", ("embed_tokens", "embedding"), (v, e), None)]
  router = set(router_layers)
  for i in range(cfg.num_layers):
    pre, ours = f"model.layers.{i}.", f"layers_{i}"
    specs += [
        TensorSpec(pre + "input_layernorm.weight", (ours, "input_norm", "scale"), (e,), None),
        TensorSpec(pre + "self_attn.q_proj.weight", (ours, "attn", "q_proj", "kernel"), (e, h, d), 1),
        TensorSpec(pre + "self_attn.k_proj.weight", (ours, "attn", "k_proj", "kernel"), (e, kv, d), 1),
        TensorSpec(pre + "self_attn.v_proj.weight", (ours, "attn", "v_proj", "kernel"), (e, kv, d), 1),
        TensorSpec(pre + "self_attn.o_proj.weight", (ours, "attn", "o_proj", "kernel"), (h, d, e), 2),
        TensorSpec(pre + "self_attn.q_norm.weight", (ours, "attn", "q_norm", "scale"), (d,), None),
        TensorSpec(pre + "self_attn.k_norm.weight", (ours, "attn", "k_norm", "scale"), (d,), None),
        TensorSpec(pre + "post_attention_layernorm.weight", (ours, "post_attn_norm", "scale"), (e,),
                   None),
        TensorSpec(pre + "mlp.gate_proj.weight", (ours, "mlp", "gate_proj", "kernel"), (e, m), 1),
        TensorSpec(pre + "mlp.up_proj.weight", (ours, "mlp", "up_proj", "kernel"), (e, m), 1),
        TensorSpec(pre + "mlp.down_proj.weight", (ours, "mlp", "down_proj", "kernel"), (m, e), 1),
    ]
    if i in router:
      specs += [
          TensorSpec(pre + "self_attn.router_q_proj.0.weight", (ours, "attn", "router_q", "kernel"),
                     (e, h, d), 1),
          TensorSpec(pre + "self_attn.router_k_proj.0.weight", (ours, "attn", "router_k", "kernel"),
                     (e, kv, d), 1),
      ]
  specs.append(TensorSpec("model.norm.weight", ("final_norm", "scale"), (e,), None))
  if not cfg.tie_word_embeddings:
    specs.append(TensorSpec("lm_head.weight", ("lm_head",), (e, v), 1))
  return specs


def is_router_spec(spec: TensorSpec) -> bool:
  return ROUTER_NAME.match(spec.hf_name) is not None


def get_path(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def set_path(tree: dict, path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value
