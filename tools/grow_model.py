"""Writes a deeper copy of a trained msa_jax checkpoint: new identity layers inserted after one
layer (msa_jax/training/grow.py), so a larger model can be trained on from the smaller one with
`model.init_from`.

  python tools/grow_model.py --model=models/tiny_msa --after=2 --new_layers=2 --output=/tmp/grown
"""

import os

from absl import flags

import msa_jax
from msa_jax.checkpoint import convert
from msa_jax.cli import quiet_library_logs, run
from msa_jax.model.param_layout import unstack_layers
from msa_jax.training.grow import grow_depth

_MODEL = flags.DEFINE_string("model", None, "msa_jax checkpoint directory to grow.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Destination directory.", required=True)
_AFTER = flags.DEFINE_integer("after", None, "Insert after this layer (-1: before the first).",
                              required=True)
_NEW = flags.DEFINE_integer("new_layers", 1, "Layers to insert.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the new layers' random weights.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")


def main(argv):
  del argv
  quiet_library_logs()
  model = msa_jax.load(_MODEL.value, scan_layers=False)
  params, model_cfg, msa_cfg = grow_depth(unstack_layers(model.params), model.model_config, model.msa_config,
                                          after=_AFTER.value, count=_NEW.value, seed=_SEED.value)
  side = [os.path.join(_MODEL.value, name) for name in convert.SIDE_FILES]
  out = convert.write_checkpoint_dir(
      _OUTPUT.value, model_cfg, msa_cfg, params, side_files=side, overwrite=_OVERWRITE.value,
      extra_meta={"grown_from": os.path.abspath(_MODEL.value), "grown_after": _AFTER.value,
                  "grown_layers": _NEW.value})
  print(f"wrote {out}: {model_cfg.num_layers} layers, router layers {list(msa_cfg.router_layers)}")


if __name__ == "__main__":
  run(main)
