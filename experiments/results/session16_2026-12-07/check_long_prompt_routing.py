"""Session 16's GPU check of the token-tiled routing kernel at the shape that overran an H100's
shared memory (the demo's prefill: 8 requests x 2048 prompt tokens, 8/4 heads of 32): pallas_gpu
against the reference, same documents selected, and both timed.

  python experiments/results/session16_2026-12-07/check_long_prompt_routing.py
"""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.memory import time_call
from msa_jax import config as cfglib
from msa_jax.kernels.routing import pallas_gpu, reference
from msa_jax.model import router, router_keys

B, T, H, HKV, D, C, DOCS = 8, 2048, 8, 4, 32, 32768, 4096  # C chunks = 256K memory tokens


def main():
  rng = np.random.default_rng(0)
  chunk_doc = np.sort(rng.integers(1, DOCS + 1, C)).astype(np.int32)  # ragged, contiguous
  raw = rng.standard_normal((C, HKV, D)).astype(np.float32)
  for key_dtype in ("float32", "bfloat16"):
    for overrides in (dict(), dict(query_reduce="mean"), dict(head_reduce="max",
                                                              query_reduce="last")):
      cfg = cfglib.MSAConfig(top_k_docs=4, **overrides)
      keys, scale = router_keys.prepare(*router_keys.quantize(raw, key_dtype), cfg)
      q = router.prepare_queries(rng.standard_normal((B, T, H, D)).astype(np.float32), cfg,
                                 coupled_scale=False)
      mask = rng.random((B, T)) < 0.3
      args = (jnp.asarray(q), jnp.asarray(mask), jnp.asarray(keys),
              None if scale is None else jnp.asarray(scale), jnp.asarray(chunk_doc), DOCS, cfg, 4)
      ref_fn = jax.jit(lambda *a: reference.top_k_documents(*a[:5], DOCS, cfg, 4))
      ker_fn = jax.jit(lambda *a: pallas_gpu.top_k_documents(*a[:5], DOCS, cfg, 4))
      want, got = ref_fn(*args[:5]), ker_fn(*args[:5])
      t_ref, t_ker = (time_call(fn, args[:5], steps=5, warmup=1)["median_s"]
                      for fn in (ref_fn, ker_fn))
      same = np.array_equal(np.asarray(got[1]), np.asarray(want[1]))
      err = float(np.max(np.abs(np.asarray(got[0]) - np.asarray(want[0]))))
      print(f"{key_dtype:8s} {overrides}: same documents {same}, max score diff {err:.2e}, "
            f"reference {t_ref * 1e3:.2f} ms, pallas_gpu {t_ker * 1e3:.2f} ms", flush=True)


if __name__ == "__main__":
  main()
