#!/usr/bin/env bash
# The recorded commands that train the shipped tiny MSA model (models/tiny_msa), in nine stages on
# one GPU (H200 times; the last two on an H100):
#   base    experiments/configs/tiny_msa.json          6,000 steps from scratch (~22 min): router
#   recall  experiments/configs/tiny_msa_recall.json   1,600 steps from base (~5 min)
#   answer  experiments/configs/tiny_msa_answer.json   2,000 steps from recall (~6 min): answer-
#           weighted loss, 70% answer steps, documents of 16-64 tokens
#   aligned experiments/configs/tiny_msa_aligned.json  3,843 of its 4,500 steps from answer (~15 min,
#           sharing the GPU with a second run). Documents in the chunk-aligned
#           layout (MSAConfig.align_doc_id: the closing [id] starts its own chunk), no weight decay,
#           LM + answer + 0.2 aux, 50% answer steps, 512-token memories then 2K. The device budget
#           ended it at step 3,843, so the recorded command pauses there.
#   extend  experiments/configs/tiny_msa_extend.json   2,558 of its 6,000 steps from aligned (~7 min
#           alone on the GPU). 2K-token memories, lr 7e-4 -> 5e-5, fresh data seed. The device
#           budget ended it at step 2,558, so the recorded command pauses there. Steps 0-1,519 ran
#           with 512-token attention tiles, the rest with 256 (the recorded command uses 256
#           throughout: the same maths, float sums in another order).
#   mixed   experiments/configs/tiny_msa_mixed.json    1,745 of its 4,200 steps from extend (~5 min
#           alone on the GPU): the shipped model. A quarter of the records hold documents of up to
#           224 tokens (data.long_doc_fraction), the rest 16-64; 2K memories (its 8K phase was not
#           reached), lr 5e-4 -> 1e-4, fresh data seed. The device budget ended it at step 1,745.
#   grow    tools/grow_model.py: the mixed stage widened to 256 (8/4 heads, MLP 768; 5.44M params),
#           computing what it did (msa_jax/training/grow.py), so more capacity starts from what it
#           knows instead of from scratch (the from-scratch recipe was too slow, BENCHMARKS §15).
#   wide    experiments/configs/tiny_msa_wide.json     2,500 steps from grow (~15 min alone on an
#           H100, 340 ms/step). The mixed stage's tasks plus needles among other needles
#           (niah_multi_key), 16 near-namesake distractors, miss rounds, lr 5e-4 -> 5e-5.
#   needles experiments/configs/tiny_msa_needles.json  1,500 steps from wide (~9 min alone on an
#           H100, 335 ms/step): the shipped model. A fifth of the records are memories of 16
#           needles of different keys (data.niah_keys), needle memories hold fact cards among
#           their distractors (data.card_distractors 0.5), lr 3e-4 -> 3e-5.
# Each stage writes WORKDIR/<stage>/final (a paused stage: WORKDIR/<stage>/snapshot); a later
# stage continues from the previous one.
# Jobs with a time limit add --pause_after_step=N (extra args are passed on) and rerun the same
# command: a resumed run continues bit-identically.
#   bash experiments/train_tiny_msa.sh /tmp/tiny_msa_run                 # all stages
#   bash experiments/train_tiny_msa.sh /tmp/tiny_msa_run answer          # one stage
#   bash experiments/train_tiny_msa.sh /tmp/tiny_msa_run eval            # evaluate needles/final
set -euo pipefail
WORKDIR=${1:?usage: train_tiny_msa.sh WORKDIR [base|recall|answer|aligned|extend|mixed|grow|wide|needles|eval] [train.py flags]}
WHAT=${2:-all}
stage() {  # stage NAME CONFIG [PREVIOUS]
  local init=()
  if [[ -n "${3:-}" ]]; then
    local previous="$WORKDIR/$3/final"
    [[ -d "$previous" ]] || previous="$WORKDIR/$3/snapshot"  # that stage was paused
    init=(--set="model.init_from=$previous")
  fi
  python3 experiments/train.py --config="experiments/configs/$2" --workdir="$WORKDIR/$1" \
      "${init[@]}" "${@:4}"
}
grow() {  # the mixed stage widened (function-preserving) to WORKDIR/grown/final
  [[ -d "$WORKDIR/grown/final" ]] || python3 tools/grow_model.py \
      --model="$WORKDIR/mixed/snapshot" --hidden_size=256 --intermediate_size=768 --num_heads=8 \
      --output="$WORKDIR/grown/final"
}
case "$WHAT" in
  all) stage base tiny_msa.json "" "${@:3}"; stage recall tiny_msa_recall.json base "${@:3}"
       stage answer tiny_msa_answer.json recall "${@:3}"
       stage aligned tiny_msa_aligned.json answer --pause_after_step=3843 "${@:3}"
       stage extend tiny_msa_extend.json aligned --pause_after_step=2558 \
             --set=model.overrides.attention_block=256 "${@:3}"
       stage mixed tiny_msa_mixed.json extend --pause_after_step=1745 "${@:3}"
       grow; stage wide tiny_msa_wide.json grown "${@:3}"
       stage needles tiny_msa_needles.json wide "${@:3}" ;;
  base) stage base tiny_msa.json "" "${@:3}" ;;
  recall) stage recall tiny_msa_recall.json base "${@:3}" ;;
  answer) stage answer tiny_msa_answer.json recall "${@:3}" ;;
  aligned) stage aligned tiny_msa_aligned.json answer --pause_after_step=3843 "${@:3}" ;;
  extend) stage extend tiny_msa_extend.json aligned --pause_after_step=2558 \
              --set=model.overrides.attention_block=256 "${@:3}" ;;
  mixed) stage mixed tiny_msa_mixed.json extend --pause_after_step=1745 "${@:3}" ;;
  grow) grow ;;
  wide) stage wide tiny_msa_wide.json grown "${@:3}" ;;
  needles) stage needles tiny_msa_needles.json wide "${@:3}" ;;
  eval)
    for task in fact_lookup multi_hop niah_single; do
      python3 experiments/eval_synthetic.py --checkpoint="$WORKDIR/needles/final" --task=$task \
          --memory_tokens=16384 --num_records="${EVAL_RECORDS:-48}" --seed=1000 --batch_size=16 \
          --max_doc_tokens=64 --out="$WORKDIR/eval_${task}_16k.json"
    done ;;
  *) echo "unknown stage $WHAT" >&2; exit 2 ;;
esac
