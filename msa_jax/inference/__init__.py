"""Generation: the engine (prefill, decode, KV cache, sampling), Memory Interleave, serving, evaluation."""
