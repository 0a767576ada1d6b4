#!/usr/bin/env bash
# The recorded command that trains the shipped tiny MSA model (models/tiny_msa) and evaluates it on
# held-out fact-lookup questions over 64K-token memories. Run on one GPU (H200, ~22 minutes of steps).
# Jobs with a time limit add --pause_after_step=N (extra args are passed on) and rerun on the same
# workdir: a resumed run continues bit-identically (the shipped model was trained in four such jobs).
#   bash experiments/train_tiny_msa.sh /tmp/tiny_msa_run            # train
#   bash experiments/train_tiny_msa.sh /tmp/tiny_msa_run train --pause_after_step=2000  # in parts
#   bash experiments/train_tiny_msa.sh /tmp/tiny_msa_run eval       # evaluate <workdir>/final
set -euo pipefail
WORKDIR=${1:?usage: train_tiny_msa.sh WORKDIR [eval]}
if [[ "${2:-train}" == "train" ]]; then
  python3 experiments/train.py --config=experiments/configs/tiny_msa.json --workdir="$WORKDIR" "${@:3}"
else
  python3 experiments/eval_synthetic.py --checkpoint="$WORKDIR/final" --task=fact_lookup \
      --memory_tokens=65536 --num_records="${EVAL_RECORDS:-100}" --seed=1000 --batch_size=8 \
      --out="$WORKDIR/eval_fact_lookup_64k.json"
fi
