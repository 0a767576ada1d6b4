"""Kernels, one folder per op: api.py (dispatch), reference.py (plain jnp, the truth in tests), and
the op's implementations (blockwise XLA, Pallas pallas_gpu.py / pallas_tpu.py)."""
