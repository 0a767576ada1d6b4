#!/usr/bin/env bash
# Quick start: make a tiny random Qwen3 checkpoint, convert it to msa_jax, generate a few tokens.
set -euo pipefail
out=${1:-/tmp/msa_jax_quickstart}
cd "$(dirname "$0")/.."
python tools/make_random_checkpoint.py --preset=tiny --output="$out/hf" --overwrite
python tools/convert_checkpoint.py --direction=hf_to_msa_jax --input="$out/hf" --output="$out/msa" --overwrite
python experiments/generate.py --checkpoint="$out/msa" --prompt="Hello, memory!" --max_new_tokens=8
