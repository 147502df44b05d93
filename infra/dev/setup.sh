#!/usr/bin/env bash
# Create .venv and install ctrak with its test tools. Safe to rerun.
# On a CPU machine the CPU build of torch (torch==2.13.0) is installed first, so that nothing
# pulls the multi-GB CUDA build: from TORCH_INDEX_URL when it is set (PyTorch's CPU wheel
# index, on a machine that reaches it), else from pip's configured index and find-links
# (which provide the CPU wheel here; plain PyPI's Linux wheel brings the CUDA libraries).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/pip install -q "torch>=2.4"
  else
    .venv/bin/pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi
.venv/bin/pip install -q -e ".[test]"
