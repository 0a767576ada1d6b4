"""absl flags shared by the binaries that answer questions over a bank (generate, eval): Memory
Interleave, sampling and serving settings, defined once so the binaries agree."""

from __future__ import annotations

from absl import flags

from msa_jax.inference.interleave import InterleaveConfig
from msa_jax.kernels.routing.api import IMPLEMENTATIONS
from msa_jax.inference.requests import SamplingConfig

_DEFAULT = InterleaveConfig()
_MAX_ROUNDS = flags.DEFINE_integer("max_rounds", _DEFAULT.max_rounds, "Retrieval rounds before a "
                                   "question that keeps asking for documents is stopped.")
_ROUND_TOKENS = flags.DEFINE_integer("round_tokens", _DEFAULT.round_tokens,
                                     "New tokens allowed per retrieval round.")
_ANSWER_TOKENS = flags.DEFINE_integer("answer_tokens", _DEFAULT.answer_tokens,
                                      "New tokens allowed for the answer.")
_ROUTER_ONLY = flags.DEFINE_bool("router_only", False, "Retrieve by router score instead of by the "
                                 "ids the model writes (for models not trained to write ids).")
_ROUTER_ROUNDS = flags.DEFINE_integer("router_rounds", _DEFAULT.router_rounds,
                                      "Router-only mode: retrieval rounds.")
_ROUTER_DOCS = flags.DEFINE_integer("router_docs", _DEFAULT.router_docs,
                                    "Router-only mode: documents per round.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0: greedy).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_SEED = flags.DEFINE_integer("sampling_seed", 0, "Sampling seed.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Requests the engine runs together.")
_TIER = flags.DEFINE_enum("tier", "auto", ["auto", "device", "pinned_host", "tensorstore"],
                          "Where the bank's content K/V live while serving.")
_ROUTING = flags.DEFINE_enum("routing_kernel", "auto", list(IMPLEMENTATIONS), "Routing over the "
                             "bank: the fused Pallas kernel of the backend (auto), or one forced.")
_DEVICES = flags.DEFINE_integer("memory_devices", None, "Devices the bank is sharded over "
                                "(default: all).")


def interleave_config() -> InterleaveConfig:
  return InterleaveConfig(max_rounds=_MAX_ROUNDS.value, round_tokens=_ROUND_TOKENS.value,
                          answer_tokens=_ANSWER_TOKENS.value, router_only=_ROUTER_ONLY.value,
                          router_rounds=_ROUTER_ROUNDS.value, router_docs=_ROUTER_DOCS.value)


def server_kwargs() -> dict:
  """Keyword arguments of `serving.open_server`."""
  return dict(tier=_TIER.value, max_batch=_MAX_BATCH.value, memory_devices=_DEVICES.value,
              routing_kernel=_ROUTING.value,
              sampling=SamplingConfig(temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                                      seed=_SEED.value))
