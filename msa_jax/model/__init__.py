"""Flax Linen modules of the Qwen3 backbone and (from the MSA issue on) Memory Sparse Attention."""
