"""absl flags of how the demo binaries retrieve (experiments/demo.py, experiments/single_needle.py),
defined once so they agree. Importing defines nothing; a binary calls `define_retrieval_flags()`
at its top level and reads the values after absl has parsed the command line."""

from __future__ import annotations

import dataclasses

from absl import flags

from benchmarks.demo import DemoSettings, demo_interleave
from msa_jax.inference.interleave import InterleaveConfig


@dataclasses.dataclass(frozen=True)
class RetrievalFlags:
  max_rounds: flags.FlagHolder
  router_only: flags.FlagHolder
  routed_ids: flags.FlagHolder
  routed_choices: flags.FlagHolder
  top_k_docs: flags.FlagHolder

  def interleave(self) -> InterleaveConfig:
    """`demo_interleave` of the flags, routed options only where given."""
    given = lambda holder: holder.value if holder.present else None
    return demo_interleave(self.max_rounds.value, router_only=self.router_only.value,
                           routed_ids=given(self.routed_ids),
                           routed_choices=given(self.routed_choices))

  def selected_documents(self) -> int | None:
    """The settings' `top_k_docs` (None: the model's own)."""
    return self.top_k_docs.value or None


def define_retrieval_flags(flag_values: flags.FlagValues = flags.FLAGS) -> RetrievalFlags:
  fv = dict(flag_values=flag_values)
  return RetrievalFlags(
      max_rounds=flags.DEFINE_integer("max_rounds", 8, "Retrieval rounds before a question "
                                      "stops.", **fv),
      router_only=flags.DEFINE_bool("router_only", False, "Retrieve by router score instead of "
                                    "the ids the model writes (models not trained to write "
                                    "ids).", **fv),
      routed_ids=flags.DEFINE_bool("routed_ids", False, "Router-picked rounds: Memory Interleave "
                                   "writes one id per round among the documents the router "
                                   "selected (constrained decoding) instead of any id (the "
                                   "official loop, the default).", **fv),
      routed_choices=flags.DEFINE_integer("routed_choices", 1, "With --routed_ids: offer only "
                                          "this many routed documents, best router score first "
                                          "(0: all; default 1: the router picks, the model "
                                          "decides whether to retrieve).", **fv),
      top_k_docs=flags.DEFINE_integer("top_k_docs", DemoSettings.top_k_docs, "Documents each "
                                      "router layer selects (0: the model's own top_k_docs). "
                                      "The shipped model, trained with 4, writes ids exactly "
                                      "from one (BENCHMARKS.md §18).", lower_bound=0, **fv),
  )
