#!/usr/bin/env bash
# Session 17's second device call, what the CPU cannot do or does slowly: waits for the needles
# stage, then S-NIAH at 1M on the new model, the routing kernel's final code at the demo's prefill
# shape, and the demo's 88 held-out questions (seed 21) from 16K to 1M on the new model.
export PYTHONPATH=/tmp/site:$PWD JAX_COMPILATION_CACHE_DIR=/root/jcache
M=/root/runs/needles/final
until [[ -d $M ]]; do
  pgrep -f tiny_msa_needles > /dev/null || { echo "training died"; tail -c 3000 /root/runs/needles.log; exit 1; }
  sleep 5
done
tail -c 1500 /root/runs/needles.log
if [[ -n "${COPY_MODEL:-}" ]]; then  # the first call ended before the run did
  mkdir -p "$OUT/needles" && cp -r $M "$OUT/needles/final"
  cp /root/runs/needles/*.jsonl /root/runs/needles/*.png "$OUT/needles/" 2>/dev/null
fi
python3 experiments/eval_synthetic.py --checkpoint=$M --task=niah_single \
    --memory_tokens=1048576 --num_records=16 --seed=31 --batch_size=2 --max_doc_tokens=64 \
    --out="$OUT/niah_1m_needles.json" 2>&1 | tail -n 15
python3 experiments/results/session16_2026-12-07/check_long_prompt_routing.py 2>&1 | tail -n 12
python3 experiments/demo.py --checkpoint=$M --memory_tokens=1048576 --sizes=16384,65536,262144 \
    --num_single=48 --num_multi=24 --num_needle=16 --seed=21 --batch_size=8 \
    --out=/root/demo_needles 2>&1 | tail -n 30
cp /root/demo_needles/demo.json /root/demo_needles/demo.png "$OUT/" 2>/dev/null
