#!/usr/bin/env bash
# The README's sampler comparison: smollm2-135m on two built-in tasks, every sampler, the same
# forward-pass budget, seed and held-out examples. Writes artifacts/compare/smollm2-<task>/
# (compare.md, compare.json, loss.png, one run folder per sampler).
#
# Learning rates are one per sampler, chosen by 30-step probes on rotten-tomatoes (not tuned per
# task): 5e-5 for the full-parameter samplers (the main job's), 1e-4 for ZO-Act's coefficients
# (1e-3 diverged), and 1e-3 with eps 1e-2 for AR1-ZO on LoRA adapters (1e-4 barely moved them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BUDGET=${BUDGET:-200}
EVAL=${EVAL:-200}
for task in ${TASKS:-rotten-tomatoes sst-snippets}; do
  .venv/bin/metazo compare --model smollm2-135m --task "$task" --budget "$BUDGET" --eval-examples "$EVAL" \
    --sampler gaussian:lr=5e-5 --sampler rademacher:lr=5e-5 --sampler lowrank:lr=5e-5 --sampler agzo:lr=5e-5 \
    --sampler zo-act:lr=1e-4 --sampler ar1-zo:lr=1e-3,eps=1e-2 \
    --output "artifacts/compare/smollm2-$task" --overwrite --no-progress
done
# AGZO at the full-parameter lr diverged (its direction lies where the gradient is, so the
# projected gradient is about sqrt(d_in / r) times MeZO's): the same budget at a 10x lower lr.
for task in ${TASKS:-rotten-tomatoes sst-snippets}; do
  .venv/bin/metazo compare --model smollm2-135m --task "$task" --budget "$BUDGET" --eval-examples "$EVAL" \
    --sampler agzo:lr=5e-6 --output "artifacts/compare/smollm2-$task-agzo-lr5e-6" --overwrite --no-progress
done
