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
# DeepSpeed JIT-compiles its CPU collective op (shared-memory all-reduce) on first use: about a minute on 2
# cores, here once instead of inside the first training run. (torch builds it again when another `ninja`
# comes first on PATH: the pip and the system ninja record build commands differently.)
echo "setup: building DeepSpeed's CPU communication op"
DS_ACCELERATOR=cpu .venv/bin/python -c "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load(verbose=False)" \
  > .venv/deepspeed-op-build.log 2>&1 \
  || { echo "setup: DeepSpeed's CPU op did not build (it needs g++); see .venv/deepspeed-op-build.log" >&2; exit 1; }
echo "$want" > .venv/.robust-distill-stamp
echo "setup: done"
