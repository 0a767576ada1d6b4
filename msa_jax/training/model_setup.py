"""Building the model a run trains: from a preset (random weights) or a converted checkpoint, with
its parameters created (or placed) directly with their mesh shardings."""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax

from msa_jax import config as cfglib
from msa_jax.api import load
from msa_jax.checkpoint import convert
from msa_jax.data.batch_builder import Sample, build_batch
from msa_jax.model.model import MSAForCausalLM
from msa_jax.sharding import logical_shardings
from msa_jax.training.train_config import ModelSpec


def dummy_batch(model_cfg: cfglib.ModelConfig, msa_cfg: cfglib.MSAConfig):
  """A one-row (memory, prompt) batch: parameter shapes do not depend on sequence lengths."""
  sample = Sample(documents=[[0] * msa_cfg.chunk_size], template_head=[0] * msa_cfg.template_len,
                  question=[0], answer=[0], positive_docs=[0])
  return build_batch([sample], seq_len_mem=msa_cfg.chunk_size,
                     seq_len_prompt=msa_cfg.template_len + 2, max_docs=1,
                     chunk_size=msa_cfg.chunk_size, question_position=msa_cfg.question_position,
                     pad_id=0)


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass
class BuiltModel:
  model: MSAForCausalLM
  params: object  # placed with `shardings`
  shardings: object
  abstract_params: object


def model_configs(spec: ModelSpec, vocab_size: int | None):
  """The (ModelConfig, MSAConfig) of `spec`: its preset or init_from checkpoint's, with overrides;
  a preset's vocabulary is sized to the tokenizer (rounded up to a multiple of 64)."""
  if spec.init_from:
    if os.path.exists(os.path.join(spec.init_from, convert.CONFIG_FILE)):
      _, model_cfg, msa_cfg = convert.read_meta(spec.init_from)
    else:
      model_cfg, msa_cfg = cfglib.from_hf_config(convert.read_hf_config(spec.init_from))
  else:
    model_cfg, msa_cfg = cfglib.preset(spec.preset)
  overrides = dict(spec.overrides)
  if vocab_size is not None and spec.vocab_from_tokenizer and not spec.init_from:
    overrides["vocab_size"] = round_up(vocab_size, 64)
  model_cfg = model_cfg.replace(**overrides)
  msa_cfg = msa_cfg.replace(**spec.msa_overrides).validate_for(model_cfg)
  if vocab_size is not None and vocab_size > model_cfg.vocab_size:
    raise cfglib.ConfigError(f"the tokenizer has {vocab_size} tokens but the model's vocab_size is "
                             f"{model_cfg.vocab_size}")
  return model_cfg, msa_cfg


def build_model(spec: ModelSpec, mesh, *, seed: int, vocab_size: int | None,
                init: bool = True) -> BuiltModel:
  """The model of `spec` with its parameters placed on `mesh` by logical axis rules (an msa_jax
  checkpoint's weights are read straight onto their shardings). `init=False` skips creating parameters (a resumed run
  restores them from its checkpoint)."""
  model_cfg, msa_cfg = model_configs(spec, vocab_size)
  model = MSAForCausalLM(model_cfg, msa_cfg)
  memory, prompt = dummy_batch(model_cfg, msa_cfg)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), prompt, memory))["params"]
  shardings = logical_shardings(boxed, mesh)
  abstract = nn.unbox(boxed)
  params = None
  if init and spec.init_from:
    params = load(spec.init_from, scan_layers=model_cfg.scan_layers,
                  param_dtype=model_cfg.param_dtype, shardings=shardings).params
  elif init:
    make = jax.jit(lambda key: nn.unbox(model.init(key, prompt, memory))["params"],
                   out_shardings=shardings)
    params = make(jax.random.key(seed))
  return BuiltModel(model, params, shardings, abstract)
