#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite: unit tests and the real-data checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
.venv/bin/python -m pytest -q "$@"
