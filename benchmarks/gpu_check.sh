#!/usr/bin/env bash
# The one-command GPU check: bash benchmarks/gpu_check.sh [--smoke] [--out DIR] [--gpu H100-SXM|H200|A100|L40S]
# (see benchmarks/gpu_check.py). Sets up .venv like the README's commands, then measures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python benchmarks/gpu_check.py "$@"
