#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: lint, fast tests, then the slow end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check src tests scripts
.venv/bin/pytest -m "not slow" "$@"
.venv/bin/pytest -m slow "$@"
