"""Flax Linen modules of the Qwen3 backbone and Memory Sparse Attention."""
