#!/usr/bin/env bash
# Session 18's first device call: S-NIAH at a real 1M-token memory on the shipped model (each
# router layer selecting one document, the serving setting that writes ids exactly; BENCHMARKS
# §18) with its whole log kept, then the routing kernel's shared-memory bound on the GPU
# (session 17's fix).
export JAX_COMPILATION_CACHE_DIR=/root/jcache
python3 experiments/eval_synthetic.py --checkpoint=models/tiny_msa --task=niah_single \
    --memory_tokens=1048576 --num_records=16 --seed=31 --batch_size=2 --max_doc_tokens=64 \
    --top_k_docs=1 --out="$OUT/niah_1m_k1.json" > "$OUT/niah_1m_k1.log" 2>&1
echo "niah rc=$?"; grep -v "^ *$" "$OUT/niah_1m_k1.log" | tail -n 30 | cut -c1-600
python3 experiments/results/session16_2026-12-07/check_long_prompt_routing.py > "$OUT/kernel_check.log" 2>&1
echo "kernel check rc=$?"; tail -n 25 "$OUT/kernel_check.log"
