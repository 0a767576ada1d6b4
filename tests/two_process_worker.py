"""One of two processes of `tests/test_two_process_routing.py`, as one of two hosts would be: joins
a localhost `jax.distributed` cluster (CPU collectives through gloo), loads the shared random bank
onto a mesh spanning both processes, routes and gathers, and saves the results it sees.

  python -m tests.two_process_worker PROCESS_ID PORT OUT_DIR
"""

import sys

import jax


def main(process_id: int, port: int, out_dir: str) -> None:
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_num_cpu_devices", 2)
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id)
  import numpy as np
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding, PartitionSpec as P

  from msa_jax.memory.bank_view import open_view
  from msa_jax.sharding import make_mesh
  from tests import two_process_case as case

  assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
  bank = case.bank()
  q_r, mask = case.queries()
  results = {}
  for name, shape, axes, batch_axis in (("replicated", (4,), ("memory",), None),
                                        ("sharded", (2, 2), ("data", "memory"), "data")):
    mesh = make_mesh(shape, axes)
    view = open_view(bank, mesh, case.CFG, slot_multiple=2, batch_axis=batch_axis)  # auto tier
    assert view.spec.tier == "device"  # agreed by both processes
    rows = NamedSharding(mesh, P(batch_axis))
    place = lambda x: jax.make_array_from_callback(x.shape, rows, lambda i: x[i])
    layer = view.at(0)
    sel, (k, v, m) = jax.jit(lambda q, mk, lm: (lambda s: (s, lm.gather(s)))(
        lm.route(q, mk, case.CFG)))(place(q_r), place(mask), layer)
    for field, x in (("scores", sel.scores), ("index", sel.doc_index), ("k", k), ("mask", m)):
      results[f"{name}_{field}"] = np.asarray(multihost_utils.process_allgather(x, tiled=True))
  np.savez(f"{out_dir}/process_{process_id}.npz", **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
