"""Hugging Face / PyTorch safetensors <-> msa_jax parameters, and our orbax checkpoint directories."""
