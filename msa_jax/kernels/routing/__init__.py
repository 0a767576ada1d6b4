"""Routing over one shard of a memory bank: scores, head/token/chunk reductions, document top-k."""
