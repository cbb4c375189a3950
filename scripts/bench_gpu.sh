#!/usr/bin/env bash
# The GPU figures of issue 5 (`metazo bench`, bf16, batch 16, sequence 256) for the four real shapes,
# with the Gaussian step (two passes, and both signs in one paired forward) and the low-rank sampler
# (paired: shared base weights, +-eps (xV)U^T). Each run prints its table and writes its JSON under
# artifacts/bench/gpu/. Usage: bash scripts/bench_gpu.sh [extra bench options, e.g. --repeats 20]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-artifacts/bench/gpu}
mkdir -p "$OUT"
common=(--device cuda --dtype bf16 --batch 16 --seq-len 256 --repeats 10 --warmup 3)
for shape in llama-3.2-1b opt-1.3b smollm2-135m qwen2.5-1.5b; do
  for variant in "gaussian" "gaussian --paired" "lowrank --paired"; do
    read -r sampler paired <<<"$variant"
    name="$shape-$sampler${paired:+-paired}"
    "$PYTHON" -m metazo bench --model "$shape" --sampler "$sampler" ${paired:+$paired} "${common[@]}" "$@" --json > "$OUT/$name.json"
    "$PYTHON" -c 'import json, sys; from metazo.bench import format_report; print(format_report(json.load(open(sys.argv[1]))))' "$OUT/$name.json"
    echo
  done
done
# Item 5: the meta-step's time and peak memory against the paper's deep-copy way, same model and batch.
"$PYTHON" scripts/meta_cost.py --model smollm2-135m --batch 16 --device cuda --repeats 5
