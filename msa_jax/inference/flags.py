"""absl flags shared by the binaries that answer questions over a bank (generate, eval): Memory
Interleave, sampling and serving settings, defined once so the binaries agree.

Importing this module defines nothing; a binary calls `define_serving_flags()` at its top level
and reads the values through the returned `ServingFlags` after absl has parsed the command line."""

from __future__ import annotations

import dataclasses

from absl import flags

from msa_jax.inference.interleave import InterleaveConfig
from msa_jax.inference.requests import SamplingConfig
from msa_jax.kernels.routing.api import IMPLEMENTATIONS


@dataclasses.dataclass(frozen=True)
class ServingFlags:
  """The holders of the serving flags (values are read after parsing)."""

  max_rounds: flags.FlagHolder
  round_tokens: flags.FlagHolder
  answer_tokens: flags.FlagHolder
  router_only: flags.FlagHolder
  router_rounds: flags.FlagHolder
  router_docs: flags.FlagHolder
  routed_ids: flags.FlagHolder
  routed_choices: flags.FlagHolder
  temperature: flags.FlagHolder
  top_p: flags.FlagHolder
  sampling_seed: flags.FlagHolder
  max_batch: flags.FlagHolder
  tier: flags.FlagHolder
  routing_kernel: flags.FlagHolder
  memory_devices: flags.FlagHolder
  top_k_docs: flags.FlagHolder

  def load_overrides(self) -> dict:
    """Keyword arguments of `msa_jax.load` that serving settles (the documents each router layer
    selects)."""
    return dict(top_k_docs=self.top_k_docs.value)

  def interleave_config(self) -> InterleaveConfig:
    return InterleaveConfig(max_rounds=self.max_rounds.value, round_tokens=self.round_tokens.value,
                            answer_tokens=self.answer_tokens.value,
                            router_only=self.router_only.value,
                            router_rounds=self.router_rounds.value,
                            router_docs=self.router_docs.value,
                            routed_ids=self.routed_ids.value,
                            routed_choices=self.routed_choices.value)

  def server_kwargs(self) -> dict:
    """Keyword arguments of `serving.open_server`."""
    return dict(tier=self.tier.value, max_batch=self.max_batch.value,
                memory_devices=self.memory_devices.value,
                routing_kernel=self.routing_kernel.value,
                sampling=SamplingConfig(temperature=self.temperature.value, top_p=self.top_p.value,
                                        seed=self.sampling_seed.value))


def define_serving_flags(flag_values: flags.FlagValues = flags.FLAGS) -> ServingFlags:
  """Defines the serving flags in `flag_values` (once per binary) and returns their holders."""
  default = InterleaveConfig()
  fv = dict(flag_values=flag_values)
  return ServingFlags(
      max_rounds=flags.DEFINE_integer("max_rounds", default.max_rounds, "Retrieval rounds before a "
                                      "question that keeps asking for documents is stopped.", **fv),
      round_tokens=flags.DEFINE_integer("round_tokens", default.round_tokens,
                                        "New tokens allowed per retrieval round.", **fv),
      answer_tokens=flags.DEFINE_integer("answer_tokens", default.answer_tokens,
                                         "New tokens allowed for the answer.", **fv),
      router_only=flags.DEFINE_bool("router_only", False, "Retrieve by router score instead of by "
                                    "the ids the model writes (for models not trained to write "
                                    "ids).", **fv),
      router_rounds=flags.DEFINE_integer("router_rounds", default.router_rounds,
                                         "Router-only mode: retrieval rounds.", **fv),
      router_docs=flags.DEFINE_integer("router_docs", default.router_docs,
                                       "Router-only mode: documents per round.", **fv),
      routed_ids=flags.DEFINE_bool("routed_ids", False, "Retrieval rounds write one id among the "
                                   "documents the router selected (constrained greedy decoding), "
                                   "or end retrieval.", **fv),
      routed_choices=flags.DEFINE_integer("routed_choices", default.routed_choices, "With "
                                          "--routed_ids: offer only this many routed documents, "
                                          "best router score first (0: all; 1: the router picks, "
                                          "the model decides whether to retrieve again).", **fv),
      temperature=flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0: greedy).", **fv),
      top_p=flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.", **fv),
      sampling_seed=flags.DEFINE_integer("sampling_seed", 0, "Sampling seed.", **fv),
      max_batch=flags.DEFINE_integer("max_batch", 16, "Requests the engine runs together.", **fv),
      tier=flags.DEFINE_enum("tier", "auto", ["auto", "device", "pinned_host", "tensorstore"],
                             "Where the bank's content K/V live while serving.", **fv),
      routing_kernel=flags.DEFINE_enum("routing_kernel", "auto", list(IMPLEMENTATIONS),
                                       "Routing over the bank: the fused Pallas kernel of the "
                                       "backend (auto), or one forced.", **fv),
      memory_devices=flags.DEFINE_integer("memory_devices", None, "Devices the bank is sharded "
                                          "over (default: all).", **fv),
      top_k_docs=flags.DEFINE_integer("top_k_docs", None, "Documents each router layer selects "
                                      "(default: the model's top_k_docs; fewer documents can "
                                      "make written ids exact, BENCHMARKS §18).", lower_bound=1,
                                      **fv),
  )
