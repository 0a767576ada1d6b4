"""Random Hugging Face checkpoints made without torch: for the quick start, demos and benchmarks, where
no real weights can be downloaded. The output is a regular HF directory (config.json,
model.safetensors, tokenizer.json) that transformers loads and the converter reads.
"""

from __future__ import annotations

import json
import os

import numpy as np

from msa_jax import config as cfglib
from msa_jax.atomic_dir import atomic_output_dir
from msa_jax.checkpoint.hf_names import tensor_specs
from msa_jax.checkpoint.safetensors_dir import write_safetensors_dir
from msa_jax.data.tokenizer import build_byte_tokenizer
from msa_jax.model.layers import dtype_of


def write_random_hf_checkpoint(path: str, model_cfg: cfglib.ModelConfig,
                               msa_cfg: cfglib.MSAConfig | None = None, *, seed: int = 0,
                               overwrite: bool = False) -> str:
  """Writes a Qwen3 (msa_cfg None) or MSA-format checkpoint with N(0, initializer_range) weights,
  norm scales near 1, and a byte-level tokenizer with MSA's special tokens."""
  tokenizer = build_byte_tokenizer()
  if tokenizer.get_vocab_size() > model_cfg.vocab_size:
    raise ValueError(f"vocab_size {model_cfg.vocab_size} is smaller than the byte tokenizer's "
                     f"{tokenizer.get_vocab_size()} tokens")
  rng = np.random.default_rng(seed)
  dtype = dtype_of(model_cfg.param_dtype)
  specs = tensor_specs(model_cfg, msa_cfg.router_layers if msa_cfg else ())

  def tensors():
    for spec in specs:
      if spec.linear_in_dims is None and len(spec.shape) == 1:  # a norm scale
        value = 1.0 + 0.1 * rng.standard_normal(spec.hf_shape)
      else:
        value = rng.normal(0.0, model_cfg.initializer_range, spec.hf_shape)
      yield spec.hf_name, value.astype(dtype)

  with atomic_output_dir(path, overwrite=overwrite) as tmp:
    write_safetensors_dir(tmp, tensors())
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(cfglib.to_hf_config(model_cfg, msa_cfg), f, indent=2)
    tokenizer.save(os.path.join(tmp, "tokenizer.json"))
  return os.path.abspath(path)
