"""Writes a deeper and/or wider copy of a trained msa_jax checkpoint that computes what the original
does (msa_jax/training/grow.py), so a larger model can be trained on from the smaller one with
`model.init_from`.

  python tools/grow_model.py --model=models/tiny_msa --after=2 --new_layers=2 --output=/tmp/deeper
  python tools/grow_model.py --model=models/tiny_msa --hidden_size=256 --intermediate_size=768 \
      --num_heads=8 --output=/tmp/wider

Width is grown first, then depth (the new layers are built at the new width).
"""

import os

from absl import app, flags

import msa_jax
from msa_jax.checkpoint import convert
from msa_jax.cli import quiet_library_logs, run
from msa_jax.model.param_layout import unstack_layers
from msa_jax.training.grow import grow_depth, grow_width

_MODEL = flags.DEFINE_string("model", None, "msa_jax checkpoint directory to grow.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Destination directory.", required=True)
_AFTER = flags.DEFINE_integer("after", None, "Deepen: insert layers after this layer (-1: before "
                              "the first).")
_NEW = flags.DEFINE_integer("new_layers", 1, "Deepen: layers to insert (with --after).")
_HIDDEN = flags.DEFINE_integer("hidden_size", None, "Widen: the new hidden size.")
_INTERMEDIATE = flags.DEFINE_integer("intermediate_size", None, "Widen: the new MLP size "
                                     "(default: the model's).")
_HEADS = flags.DEFINE_integer("num_heads", None, "Widen: the new query heads, a multiple of the "
                              "model's (KV heads follow at the same group size; default: the "
                              "model's).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the new weights' random values.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")


def main(argv):
  del argv
  quiet_library_logs()
  widen = any(f.value is not None for f in (_HIDDEN, _INTERMEDIATE, _HEADS))
  if not widen and _AFTER.value is None:
    raise app.UsageError("nothing to grow: give --after (deeper) and/or --hidden_size, "
                         "--intermediate_size, --num_heads (wider)")
  model = msa_jax.load(_MODEL.value, scan_layers=False)
  params, model_cfg, msa_cfg = unstack_layers(model.params), model.model_config, model.msa_config
  meta = {"grown_from": os.path.abspath(_MODEL.value)}
  if widen:
    params, model_cfg = grow_width(
        params, model_cfg, msa_cfg,
        hidden_size=_HIDDEN.value or model_cfg.hidden_size,
        intermediate_size=_INTERMEDIATE.value or model_cfg.intermediate_size,
        num_heads=_HEADS.value or model_cfg.num_heads, seed=_SEED.value)
    meta["grown_width"] = [model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.num_heads]
  if _AFTER.value is not None:
    params, model_cfg, msa_cfg = grow_depth(params, model_cfg, msa_cfg, after=_AFTER.value,
                                            count=_NEW.value, seed=_SEED.value)
    meta.update(grown_after=_AFTER.value, grown_layers=_NEW.value)
  side = [os.path.join(_MODEL.value, name) for name in convert.SIDE_FILES]
  out = convert.write_checkpoint_dir(_OUTPUT.value, model_cfg, msa_cfg, params, side_files=side,
                                     overwrite=_OVERWRITE.value, extra_meta=meta)
  print(f"wrote {out}: {model_cfg.num_layers} layers of {model_cfg.hidden_size} "
        f"({model_cfg.num_heads}/{model_cfg.num_kv_heads} heads, MLP {model_cfg.intermediate_size}), "
        f"router layers {list(msa_cfg.router_layers)}")


if __name__ == "__main__":
  run(main)
