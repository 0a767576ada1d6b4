#!/usr/bin/env bash
# From-scratch runs of experiments/configs/small_msa.json at three widths, side by side on one GPU
# (BENCHMARKS.md issue 11 §14). On the device machine, from the repository root:
#   bash experiments/results/session14_2026-12-07/variants.sh start NAME...   # background runs
#   bash experiments/results/session14_2026-12-07/variants.sh watch SECONDS NAME...
#   bash experiments/results/session14_2026-12-07/variants.sh stop NAME...
#   bash experiments/results/session14_2026-12-07/variants.sh pack NAME...    # final (else snapshot) to $OUT
# A run started with EXTRA=--pause_after_seconds=S ends itself with WORKDIR/snapshot (params only).
set -uo pipefail
RUNS=${RUNS:-/root/runs}
CFG=experiments/configs/small_msa.json
declare -A ARGS=(
  [w256]=""
  [w128]="--set=model.overrides.hidden_size=128 --set=model.overrides.intermediate_size=384 --set=model.overrides.num_layers=6 --set=model.overrides.num_heads=4 --set=model.overrides.num_kv_heads=2 --set=model.msa_overrides.router_layers=[3,4,5]"
  [w384]="--set=model.overrides.hidden_size=384 --set=model.overrides.intermediate_size=1024 --set=model.overrides.num_heads=12 --set=model.overrides.num_kv_heads=4 --set=phases.1.peak_lr=0.0012 --set=phases.2.peak_lr=0.001"
)
what=$1; shift
mkdir -p "$RUNS"
case "$what" in
  start)
    for name in "$@"; do
      setsid nohup env XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.3} PYTHONUNBUFFERED=1 \
        python3 experiments/train.py --config=$CFG --workdir="$RUNS/$name" ${ARGS[$name]} \
        ${EXTRA:-} >> "$RUNS/$name.log" 2>&1 < /dev/null &
    done ;;
  watch)
    seconds=$1; shift; t0=$(date +%s)
    while (( $(date +%s) - t0 < seconds )) && pgrep -f "workdir=$RUNS/" > /dev/null; do
      sleep 30
      for name in "$@"; do
        echo "$name: $(grep -E '^step ' "$RUNS/$name.log" | tail -1 | sed -E 's/prompt_dense_loss [^ ]+ //; s/context_lm_loss [^ ]+ //; s/recall@5[^|]*//')"
      done
    done
    for name in "$@"; do
      cp "$RUNS/$name/metrics.jsonl" "$OUT/${name}_metrics.jsonl" 2>/dev/null
      grep -vE '^step |Warn' "$RUNS/$name.log" | tail -5
    done ;;
  pack)
    for name in "$@"; do
      what=snapshot; [ -d "$RUNS/$name/final" ] && what=final
      cp "$RUNS/$name/metrics.jsonl" "$OUT/${name}_metrics.jsonl"
      tar -C "$RUNS/$name" -cf - $what | split -b 15M - "$OUT/${name}_$what.tar.part"
    done ;;
  stop)
    for name in "$@"; do pkill -f "workdir=$RUNS/$name " ; done ;;
esac
