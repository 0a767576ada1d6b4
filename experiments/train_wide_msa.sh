#!/usr/bin/env bash
# The shipped model, widened and trained on (issue 11: capacity without relearning). Step 1 writes
# a 256-wide copy of models/tiny_msa (8/4 heads, MLP 768; 5.3M params) that computes what the
# shipped model does (tools/grow_model.py, msa_jax/training/grow.py); step 2 trains it with
# experiments/configs/tiny_msa_wide.json: the shipped mix plus multi-key needles (the shipped
# model's needle shortcut, BENCHMARKS §14), 16 name negatives and miss rounds, 2K memories,
# 2,500 steps at lr 5e-4 -> 5e-5. Rerunning continues a paused run (--pause_after_seconds=S).
#   bash experiments/train_wide_msa.sh WORKDIR [train.py flags]
# On a device lent in calls of at most 10 minutes: give each call --pause_after_seconds=480 and copy
# WORKDIR/wide/snapshot (WORKDIR/wide/final once done) out at its end; the same command in the next
# call continues the run exactly while the machine stays warm, and a lost machine leaves the last
# snapshot to continue from with --set=model.init_from=SNAPSHOT (without the optimiser state).
set -euo pipefail
WORKDIR=${1:?usage: train_wide_msa.sh WORKDIR [train.py flags]}
FROM=${FROM:-models/tiny_msa}
mkdir -p "$WORKDIR"
if [[ ! -d "$WORKDIR/grown" ]]; then
  python3 tools/grow_model.py --model="$FROM" --hidden_size=256 --intermediate_size=768 \
      --num_heads=8 --output="$WORKDIR/grown"
fi
python3 experiments/train.py --config=experiments/configs/tiny_msa_wide.json \
    --workdir="$WORKDIR/wide" --set=model.init_from="$WORKDIR/grown" "${@:2}"
