#!/usr/bin/env bash
# Session 17's first device call: the needles stage in the background (it survives between calls
# while the machine stays warm), watched until the call's time is nearly spent. STEPS shortens it
# (the learning-rate schedule with it) when device time is short; a run that ends within the
# call comes back under $OUT.
#   bash experiments/results/session17_2026-12-07/gpu_train_needles.sh   (from the repo root, $OUT set)
export PYTHONPATH=/tmp/site:$PWD JAX_COMPILATION_CACHE_DIR=/root/jcache
start=$SECONDS
mkdir -p /root/runs
setsid nohup python3 experiments/train.py --config=experiments/configs/tiny_msa_needles.json \
    --workdir=/root/runs/needles --set=phases.0.steps=${STEPS:-1500} > /root/runs/needles.log 2>&1 < /dev/null &
while (( SECONDS - start < ${WATCH_SECONDS:-550} )); do
  sleep 20
  [[ -d /root/runs/needles/final ]] && break
done
tail -c 1500 /root/runs/needles.log
if [[ -d /root/runs/needles/final ]]; then  # done within this call: bring the model back now
  mkdir -p "$OUT/needles" && cp -r /root/runs/needles/final "$OUT/needles/final"
  cp /root/runs/needles/*.jsonl /root/runs/needles/*.png "$OUT/needles/" 2>/dev/null
fi
