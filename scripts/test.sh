#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite: unit tests and the real-data checks,
# one pytest worker per CPU core (pytest-xdist; each test module stays on one worker, so its
# module fixtures are built once, and modules start in collection order: longest first, see
# tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
.venv/bin/python -m pytest -q -n auto --dist loadscope --no-loadscope-reorder "$@"
