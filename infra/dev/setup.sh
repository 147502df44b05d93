#!/usr/bin/env bash
# Create .venv and install ctrak with its test tools. Safe to rerun.
# On a CPU machine the CPU build of torch is installed first, so that nothing pulls the
# multi-GB CUDA build (pip finds the CPU wheel in its find-links where one is provided).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/pip install -q "torch>=2.4"
  else
    .venv/bin/pip install -q "torch==2.13.0"
  fi
fi
.venv/bin/pip install -q -e ".[test]"
