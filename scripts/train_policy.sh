#!/usr/bin/env bash
# The shipped policy, policies/smollm2-135m-mixture.safetensors: meta-trained on smollm2-135m over four
# built-in tasks, then tested against MeZO on tasks outside the mixture (its card records both).
#
#   bash scripts/train_policy.sh            # CPU: 30 meta-steps in 33 min on one core (each unrolls 10 ZO
#                                           # steps), then the evidence sweep (about 2 h on one core)
#   STEPS=500 DEVICE=cuda bash scripts/train_policy.sh
#
# Held-out evidence (several seeds, written into the card): scripts/policy_evidence.py, run at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
STEPS=${STEPS:-30}
DEVICE=${DEVICE:-auto}
RUN=${RUN:-artifacts/meta/smollm2-135m-mixture}
POLICY=policies/smollm2-135m-mixture.safetensors
.venv/bin/metazo meta-train --model smollm2-135m --tasks rotten-tomatoes,tweets,sms-spam,trec \
  --steps "$STEPS" --horizon 10 --trajectory zo --reset-every 5 --meta-lr 3e-3 --probe-every 10 --device "$DEVICE" \
  --heldout-task none --output "$RUN" --overwrite --no-progress
cp "$RUN/policy.safetensors" "$POLICY"
.venv/bin/python scripts/policy_evidence.py --policy "$POLICY" --model smollm2-135m \
  --tasks "${TASKS:-sst-snippets,amazon,nyt}" --seeds "${SEEDS:-0,1,2}" --steps "${EVAL_STEPS:-100}" \
  --eval-examples 300 --record
