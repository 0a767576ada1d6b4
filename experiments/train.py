"""Trains an MSA model: the phases of a JSON config (router warm-up, main phase, memory curriculum).

  # the tiny synthetic configuration, end to end on CPU (minutes)
  python experiments/train.py --config=experiments/configs/tiny_synthetic_smoke.json --workdir=/tmp/msa_tiny
  # msa-4b from a converted checkpoint on a cluster (one process per host); no msa-4b config ships:
  # write one like experiments/configs/tiny_msa.json with "model": {"preset": "msa-4b", ...}
  python experiments/train.py --config=/path/to/msa4b_sft.json --workdir=gs://... \
      --set=model.init_from=/ckpt/qwen3-4b-msa --set=data.path=/data/train.jsonl

A killed run restarted with the same --workdir resumes from its newest checkpoint, under the config
recorded there: a change to what trained its steps is refused unless declared safe (more steps, a
later phase) or --allow_config_change; <workdir>/history.jsonl records every start, resume and
override. The final model is written to <workdir>/final (an msa_jax checkpoint), the curves to
<workdir>/curves.png.
"""

from absl import flags

import jax

from msa_jax.cli import quiet_library_logs, run
from msa_jax.training import data_setup
from msa_jax.training.model_setup import model_configs
from msa_jax.training.train_config import load_train_config
from msa_jax.training.trainer import train

_CONFIG = flags.DEFINE_string("config", None, "JSON training config file.", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, final model).",
                               required=True)
_SET = flags.DEFINE_multi_string("set", [], "Config override key.path=value (JSON value).")
_PAUSE_AFTER = flags.DEFINE_integer(
    "pause_after_step", None, "End cleanly after this step (checkpoint + <workdir>/snapshot); rerun "
    "on the same workdir to continue. For jobs with a time limit.")
_PAUSE_AFTER_SECONDS = flags.DEFINE_float(
    "pause_after_seconds", None, "Like --pause_after_step, after the first step that ends this "
    "many seconds after the start. For jobs with a wall-clock limit.")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume even though the config changes what trained the "
    "workdir's checkpoints (recorded in <workdir>/history.jsonl).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (multi-host clusters).")


def main(argv):
  del argv
  quiet_library_logs()
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  cfg = load_train_config(_CONFIG.value, _SET.value)
  tokenizer = data_setup.load_tokenizer(cfg.data)
  data_setup.check_tokenizer(tokenizer)
  tokenizer_file = data_setup.tokenizer_file(cfg.data, _WORKDIR.value)
  _, msa = model_configs(cfg.model, tokenizer.vocab_size)
  batches = data_setup.data_for_phase(cfg.data, cfg.phases, msa, tokenizer)
  result = train(cfg, _WORKDIR.value, batches, vocab_size=tokenizer.vocab_size,
                 tokenizer_file=tokenizer_file, pause_after=_PAUSE_AFTER.value,
                 pause_after_seconds=_PAUSE_AFTER_SECONDS.value,
                 allow_config_change=_ALLOW_CHANGE.value)
  if result.final_dir:
    print(f"final model: {result.final_dir}")


if __name__ == "__main__":
  run(main)
