"""Tiny random Hugging Face checkpoints written by the tests (plain Qwen3 and MSA format), and the
transformers side of parity checks. Needs torch: a test module importing this is skipped without it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402 (needs torch)

from msa_jax.data.tokenizer import build_byte_tokenizer

TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=128, vocab_size=288, rms_norm_eps=1e-6,
            max_position_embeddings=512)


def make_qwen3(path: str, *, tied: bool = False, seed: int = 0, dtype=torch.float32,
               rope_theta: float = 10_000.0, tokenizer: bool = True):
  """A random Qwen3ForCausalLM saved to `path` (with a byte tokenizer.json); returns the model."""
  torch.manual_seed(seed)
  cfg = transformers.Qwen3Config(**TINY, tie_word_embeddings=tied,
                    rope_parameters={"rope_theta": rope_theta, "rope_type": "default"})
  model = transformers.Qwen3ForCausalLM(cfg).eval()
  with torch.no_grad():  # non-trivial norm weights, so a swapped or missing norm is caught
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  model = model.to(dtype)
  model.save_pretrained(path)
  if tokenizer:
    build_byte_tokenizer().save(os.path.join(path, "tokenizer.json"))
  return model


def padded_batch(vocab: int, seed: int = 0):
  """Right-padded token rows of different lengths; mask 1 = real token."""
  rng = np.random.default_rng(seed)
  lengths = [11, 7, 3]
  tokens = np.zeros((len(lengths), max(lengths)), np.int64)
  mask = np.zeros_like(tokens)
  for r, n in enumerate(lengths):
    tokens[r, :n] = rng.integers(0, vocab, n)
    mask[r, :n] = 1
  return tokens, mask


def torch_logits(model, tokens, mask) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask))
  return out.logits.float().numpy()


def max_err_on_valid(ours, theirs, mask) -> float:
  return float(np.abs(np.asarray(ours) - theirs)[mask.astype(bool)].max())


MSA_CONFIG = {"router_layer_idx": "2,3", "top_k_docs": 2, "pooling_kernel_size": 4,
              "decouple_router": True, "aux_loss": False, "aux_loss_method": "INFONCE_DECOUPLE",
              "infonce_loss_temp": 0.1, "head_reduce_method": "mean", "query_reduce_method": "max",
              "chunk_reduce_method": "max", "lmloss_weigth": 1.0, "auxloss_weight": 0.1,
              "ansloss_weight": 1.0}


def make_msa(path: str, *, seed: int = 0, tied: bool = False) -> dict[str, np.ndarray]:
  """An MSA-format checkpoint: tiny Qwen3 + router weights + `temperature` + msa_config.

  Returns the router weights written (HF layout), keyed by tensor name.
  """
  model = make_qwen3(path, tied=tied, seed=seed)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  if tied:
    state.pop("lm_head.weight", None)
  gen = torch.Generator().manual_seed(seed + 1)
  routers = {}
  e, h, kv, d = TINY["hidden_size"], TINY["num_attention_heads"], TINY["num_key_value_heads"], 16
  for i in (2, 3):
    routers[f"model.layers.{i}.self_attn.router_q_proj.0.weight"] = torch.randn(h * d, e, generator=gen)
    routers[f"model.layers.{i}.self_attn.router_k_proj.0.weight"] = torch.randn(kv * d, e, generator=gen)
  state.update(routers)
  state["temperature"] = torch.tensor(0.1)
  os.remove(os.path.join(path, "model.safetensors"))
  save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  cfg.update(model_type="msa", architectures=["MSAForCausalLM"], msa_config=MSA_CONFIG)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  return {k: v.numpy() for k, v in routers.items()}
