"""A model and a memory bank, ready to answer questions: the bank opened and checked against the
model (a bank encoded by another model or other weights is refused), its view placed on a `memory`
mesh, the engine over it, and Memory Interleave drivers on top. `open_empty_server` serves the same
questions over no documents at all (a no-memory baseline)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from msa_jax.api import LoadedModel
from msa_jax.data import prompt_format as pf
from msa_jax.data.batch_builder import build_memory_batch
from msa_jax.inference.engine import Engine
from msa_jax.inference.interleave import (DocumentStore, InMemoryDocuments, InterleaveConfig,
                                          InterleaveDriver)
from msa_jax.inference.requests import SamplingConfig
from msa_jax.inference.routed_ids import generate_routed
from msa_jax.memory import open_bank
from msa_jax.memory.bank_view import open_view
from msa_jax.memory.routing import MEMORY_AXIS
from msa_jax.model import entry_points
from msa_jax.sharding import make_mesh


@dataclasses.dataclass
class MemoryServer:
  """`engine` serves requests over `bank` (a `memory.Bank`, or no documents for
  `open_empty_server`); `driver(config)` answers questions over it.

  `fixed_batch`: pad every call with copies of its last request (results dropped) to a multiple
  of the engine's `max_batch`, so every engine batch has the same size. The engine compiles one
  program per batch bucket; while the questions of a batch finish one by one a fixed size trades
  a little compute for fewer compilations (worth it for small models on CPU)."""

  loaded: LoadedModel
  bank: DocumentStore
  engine: Engine
  sampling: SamplingConfig
  fixed_batch: bool = False

  def generate(self, requests):
    n, size = len(requests), self.engine.max_batch
    padding = [requests[-1]] * ((-n) % size if self.fixed_batch else 0)
    return self.engine.generate(list(requests) + padding, self.sampling)[:n]

  def retrieve(self, requests, allowed):
    """Retrieval rounds under `InterleaveConfig.routed_ids` (`routed_ids.generate_routed`)."""
    return generate_routed(self.engine, requests, allowed)

  def driver(self, config: InterleaveConfig = InterleaveConfig()) -> InterleaveDriver:
    if config.max_context_tokens is None:
      config = dataclasses.replace(config, max_context_tokens=self.engine.max_prompt_len)
    return InterleaveDriver(self.generate, self.loaded.tokenizer, self.bank, config,
                            retrieve_fn=self.retrieve)


def open_server(loaded: LoadedModel, bank_path: str, *, tier: str = "auto", max_batch: int = 16,
                memory_devices: int | None = None,
                sampling: SamplingConfig = SamplingConfig(),
                fixed_batch: bool = False, routing_kernel: str = "auto") -> MemoryServer:
  """Opens the bank at `bank_path` for `loaded` (raising `BankError` if another model or other
  weights encoded it) over the first `memory_devices` devices (default: all), routing by
  `routing_kernel` (`msa_jax.kernels.routing.api`)."""
  if loaded.tokenizer is None:
    raise ValueError("the model has no tokenizer; Memory Interleave needs one")
  bank = open_bank(bank_path, loaded.model_config, loaded.msa_config, params=loaded.params)
  devices = jax.devices()[:memory_devices] if memory_devices else jax.devices()
  mesh = make_mesh((len(devices),), (MEMORY_AXIS,), devices=devices)
  view = open_view(bank, mesh, loaded.msa_config, tier=tier, routing_kernel=routing_kernel)
  engine = Engine(loaded.model, loaded.params, view, max_batch=max_batch)
  return MemoryServer(loaded, bank, engine, sampling, fixed_batch)


def open_empty_server(loaded: LoadedModel, *, max_batch: int = 16,
                      sampling: SamplingConfig = SamplingConfig(),
                      fixed_batch: bool = False) -> MemoryServer:
  """A server over a memory of zero documents, for no-memory baselines. A bank cannot be empty, so
  the engine routes over an in-memory view of one empty memory row: nothing is ever selected, and
  ids the model writes are all unknown."""
  if loaded.tokenizer is None:
    raise ValueError("the model has no tokenizer; Memory Interleave needs one")
  msa = loaded.msa_config
  memory = build_memory_batch([[]], batch_rows=1, seq_len_mem=msa.chunk_size, max_docs=1,
                              chunk_size=msa.chunk_size, pad_id=loaded.tokenizer.pad_id)
  template = jnp.asarray(loaded.tokenizer.encode(pf.TEMPLATE_HEAD), jnp.int32)
  view = jax.jit(entry_points.encode_memory, static_argnums=0)(
      loaded.model, loaded.params, memory, template).view
  engine = Engine(loaded.model, loaded.params, view, max_batch=max_batch)
  return MemoryServer(loaded, InMemoryDocuments([]), engine, sampling, fixed_batch)
