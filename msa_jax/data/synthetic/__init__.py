"""Deterministic synthetic memory tasks (fact lookup, multi-hop chains, RULER-style needles) over a
code-built world, and a small word-level tokenizer that covers that world and MSA's prompt format."""

from msa_jax.data.synthetic.tasks import (TASKS, default_length_fn, fact_lookup, generate,
                                          generate_mix, multi_hop, niah_multi_key,
                                          niah_multi_query, niah_multi_value, niah_single,
                                          pick_task)
from msa_jax.data.synthetic.world_tokenizer import (build_world_tokenizer, count_tokens,
                                                    save_world_tokenizer, world_tokenizer)

__all__ = [
    "TASKS", "build_world_tokenizer", "count_tokens", "default_length_fn", "fact_lookup",
    "generate", "generate_mix", "multi_hop", "niah_multi_key", "niah_multi_query",
    "niah_multi_value", "niah_single", "pick_task", "save_world_tokenizer", "world_tokenizer",
]
