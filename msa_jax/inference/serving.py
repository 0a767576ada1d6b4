"""A model and a memory bank, ready to answer questions: the bank opened and checked against the
model (a bank encoded by another model or other weights is refused), its view placed on a `memory`
mesh, the engine over it, and Memory Interleave drivers on top."""

from __future__ import annotations

import dataclasses

import jax

from msa_jax.api import LoadedModel
from msa_jax.inference.engine import Engine
from msa_jax.inference.interleave import InterleaveConfig, InterleaveDriver
from msa_jax.inference.requests import SamplingConfig
from msa_jax.memory import open_bank
from msa_jax.memory.bank import Bank
from msa_jax.memory.bank_view import open_view
from msa_jax.memory.routing import MEMORY_AXIS
from msa_jax.sharding import make_mesh


@dataclasses.dataclass
class MemoryServer:
  """`engine` serves requests over `bank`; `driver(config)` answers questions over it.

  `fixed_batch`: pad every call with copies of its last request (results dropped) to a multiple
  of the engine's `max_batch`, so every engine batch has the same size. The engine compiles one
  program per batch bucket; while the questions of a batch finish one by one a fixed size trades
  a little compute for fewer compilations (worth it for small models on CPU)."""

  loaded: LoadedModel
  bank: Bank
  engine: Engine
  sampling: SamplingConfig
  fixed_batch: bool = False

  def generate(self, requests):
    n, size = len(requests), self.engine.max_batch
    padding = [requests[-1]] * ((-n) % size if self.fixed_batch else 0)
    return self.engine.generate(list(requests) + padding, self.sampling)[:n]

  def driver(self, config: InterleaveConfig = InterleaveConfig()) -> InterleaveDriver:
    if config.max_context_tokens is None:
      config = dataclasses.replace(config, max_context_tokens=self.engine.max_prompt_len)
    return InterleaveDriver(self.generate, self.loaded.tokenizer, self.bank, config)


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
