#!/usr/bin/env bash
# Set up (if needed) and run the demo: synthetic Criteo-like data, train DeepFM, evaluate vs the oracle.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/deepfm demo "$@"
