"""Two processes on one machine, as two hosts would be (jax.distributed over localhost, CPU
collectives through gloo, 2 CPU devices each): the bank is placed shard by shard by the process that
owns each device, and routing and gathering give exactly what one process computes."""

import os
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

from msa_jax.model import router
from tests import two_process_case as case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_route_and_gather_like_one(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # not the 8 simulated devices
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "tests.two_process_worker", str(i), str(port),
                             str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  got = [np.load(tmp_path / f"process_{i}.npz") for i in range(2)]

  bank = case.bank()
  q_r, mask = case.queries()
  keys, offsets = bank.arrays["router_keys"][0], bank.doc_chunk_offsets
  chunk_doc = np.repeat(np.arange(1, offsets.size), np.diff(offsets)).astype(np.int32)
  b, n, k = q_r.shape[0], bank.num_docs, case.CFG.top_k_docs
  ref = router.score_documents(jnp.asarray(q_r), jnp.asarray(mask),
                               jnp.broadcast_to(keys, (b,) + keys.shape),
                               jnp.broadcast_to(chunk_doc, (b, chunk_doc.size)), case.CFG)
  ref_scores = np.asarray(ref.scores)[:, :n]
  content = bank.arrays["content_k"][0]
  for layout in ("replicated", "sharded"):
    for field in ("scores", "index", "k", "mask"):  # both processes see the same global result
      np.testing.assert_array_equal(got[0][f"{layout}_{field}"], got[1][f"{layout}_{field}"])
    index, scores = got[0][f"{layout}_index"], got[0][f"{layout}_scores"]
    gathered, gmask = got[0][f"{layout}_k"], got[0][f"{layout}_mask"]
    for row in range(b):
      order = np.argsort(-ref_scores[row], kind="stable")[:k]
      np.testing.assert_array_equal(index[row], order)
      np.testing.assert_allclose(scores[row], ref_scores[row, order], rtol=0, atol=1e-6)
      want = np.concatenate([content[offsets[d]:offsets[d + 1]] for d in order])
      np.testing.assert_array_equal(gathered[row][gmask[row]], want)
  assert 3 in got[0]["replicated_index"][0] and 0 in got[0]["replicated_index"][0]  # the tie
