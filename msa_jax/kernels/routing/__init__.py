"""Routing over a shard of the memory bank: score, reduce over heads, route tokens and chunks, top-k."""
