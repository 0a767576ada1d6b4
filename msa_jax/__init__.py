"""msa_jax: Memory Sparse Attention (MSA, arXiv 2603.23516) in JAX/Flax."""

from msa_jax.api import LoadedModel, load
from msa_jax.config import MSAConfig, ModelConfig, preset

__all__ = ["LoadedModel", "MSAConfig", "ModelConfig", "load", "preset"]
__version__ = "0.1.0"
