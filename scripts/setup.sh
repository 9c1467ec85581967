#!/usr/bin/env bash
# Create .venv with the CPU build of PyTorch (pinned: `pip install torch==2.13.0` takes the local CPU
# wheel; an unpinned torch would pull a multi-GB CUDA build), then deepfm itself with its serve, report and dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet "torch==2.13.0"
fi
.venv/bin/pip install --quiet -e ".[serve,report,tune,dev]"
