"""Trains the plain backbone (no memory) on fact lookup with the gold card in context, the
isolated copy diagnosis (msa_jax/training/in_context_recall.py); writes the held-out accuracy curve as JSON + PNG.

  python experiments/in_context_recall.py --steps=3000 --out=/tmp/recall   # one GPU: ~6 min
"""

import dataclasses
import os

from absl import app, flags

from msa_jax.atomic_dir import write_json_and_chart
from msa_jax.cli import quiet_library_logs
from msa_jax.training.in_context_recall import RecallSettings, chart, train

_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float}
for _name, _default in dataclasses.asdict(RecallSettings()).items():
  _DEFINE[type(_default)](_name, _default, f"RecallSettings.{_name}.")
_OUT = flags.DEFINE_string("out", "/tmp/in_context_recall", "Output directory (recall.json/png).")


def main(argv):
  del argv
  quiet_library_logs()
  try:
    settings = RecallSettings(**{f.name: flags.FLAGS[f.name].value
                                  for f in dataclasses.fields(RecallSettings)})
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  report = train(settings)
  paths = write_json_and_chart(report, os.path.join(_OUT.value, "recall.json"),
                               os.path.join(_OUT.value, "recall.png"), chart)
  print("wrote", *paths)


if __name__ == "__main__":
  app.run(main)
