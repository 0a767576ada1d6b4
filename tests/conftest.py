"""Test set-up: 8 simulated CPU devices (set before jax starts) and shared fixtures."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402 (after the flags above)

# One persistent compilation cache per test process (each xdist worker has its own): a program
# compiled again under a new jit wrapper (a fresh lambda, a rebuilt step, the same shapes in
# another test) loads the executable XLA built the first time instead of compiling it again (CPU
# time only; the executables are the same). The binaries the tests run through
# `tests.binary_runner` use it too. It is removed when the process exits.
CACHE_DIR = tempfile.mkdtemp(prefix="msa_jax_test_jax_cache_")
atexit.register(shutil.rmtree, CACHE_DIR, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
