"""The README's first quick-start command, end to end: random checkpoint -> convert -> generate."""

import os
import subprocess

import msa_jax
from msa_jax.inference.greedy import greedy_generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_script(tmp_path):
  result = subprocess.run(["bash", os.path.join(ROOT, "experiments", "quickstart.sh"),
                           str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "generated ids:" in result.stdout
  loaded = msa_jax.load(str(tmp_path / "msa"))
  prompt = loaded.tokenizer.encode("Hello, memory!")
  # the binary printed what the library generates for the same prompt
  new_ids = greedy_generate(loaded, prompt, 8, stop_ids=(loaded.tokenizer.im_end_id,))
  assert f"generated ids: {new_ids}" in result.stdout
