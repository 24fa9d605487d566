#!/usr/bin/env bash
# Create or reuse .venv and install robust-distill with the pinned versions of constraints.txt.
# Idempotent: a second call with unchanged pyproject.toml/constraints.txt returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f .venv/.robust-distill-stamp && $(cat .venv/.robust-distill-stamp) == "$want" ]]; then
  exit 0
fi
echo "setup: installing robust-distill and pinned dependencies into .venv (first time: a few minutes)"
# torch and torchvision first, by exact version: on the reference machine pip takes them from local disk.
.venv/bin/pip install -q -c constraints.txt torch torchvision
.venv/bin/pip install -q -c constraints.txt -e ".[dev]"
echo "$want" > .venv/.robust-distill-stamp
echo "setup: done"
