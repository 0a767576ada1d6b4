#!/usr/bin/env bash
# Session 18's first device call: the routing kernel's shared-memory bound on the GPU (session 17's
# fix), then S-NIAH at a real 1M-token memory on the shipped model with its whole log kept.
export JAX_COMPILATION_CACHE_DIR=/root/jcache
python3 experiments/results/session16_2026-12-07/check_long_prompt_routing.py > "$OUT/kernel_check.log" 2>&1
echo "kernel check rc=$?"; tail -n 25 "$OUT/kernel_check.log"
python3 experiments/eval_synthetic.py --checkpoint=models/tiny_msa --task=niah_single \
    --memory_tokens=1048576 --num_records=16 --seed=31 --batch_size=2 --max_doc_tokens=64 \
    --out="$OUT/niah_1m.json" > "$OUT/niah_1m.log" 2>&1
echo "niah rc=$?"; grep -v "^ *$" "$OUT/niah_1m.log" | tail -n 40 | cut -c1-400
