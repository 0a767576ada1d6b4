"""Generation: prompts, decoding, and (from the generation issue on) the engine and Memory Interleave."""
