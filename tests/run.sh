#!/usr/bin/env bash
# The test command: formatting, lint, then the suite (CPU only; nothing is skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff format --check ctrak pipeline jobs tests
.venv/bin/ruff check ctrak pipeline jobs tests
# headless Chromium opens the HTML report in tests/test_report.py (Debian package; root in CI)
command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
.venv/bin/python -m pytest -q "$@"
