"""Kernels, one folder per op: api.py (dispatch), reference.py (plain jnp, the truth in tests), Pallas later."""
