#!/usr/bin/env bash
# Create .venv with PyTorch, then deepfm itself with its serve, report and tune extras and the dev tools.
#
# Which torch build: an unpinned `pip install torch` on a machine without a GPU pulls the multi-GB CUDA build.
# So, unless torch is already in .venv:
#   1. DEEPFM_TORCH_INDEX_URL set: install torch from that index (e.g. a company mirror);
#   2. a torch wheel available offline (pip's find-links, as on the project's CI machines): use it;
#   3. no NVIDIA GPU (`nvidia-smi` absent): PyTorch's CPU wheel index (https://download.pytorch.org/whl/cpu);
#   4. otherwise PyPI's default build (CUDA on Linux).
# DEEPFM_TORCH_SPEC overrides the requirement (default "torch>=2.4", matching pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SPEC=${DEEPFM_TORCH_SPEC:-torch>=2.4}
CPU_INDEX=https://download.pytorch.org/whl/cpu
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/pip install --quiet)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${DEEPFM_TORCH_INDEX_URL:-}" ]; then
    echo "setup: torch from DEEPFM_TORCH_INDEX_URL=$DEEPFM_TORCH_INDEX_URL"
    "${PIP[@]}" --index-url "$DEEPFM_TORCH_INDEX_URL" "$SPEC"
  elif "${PIP[@]}" --no-index --no-deps "$SPEC" 2>/dev/null; then
    TV=$(.venv/bin/pip show torch | sed -n 's/^Version: //p')
    echo "setup: torch $TV from a local wheel"
    "${PIP[@]}" "torch==$TV"  # its dependencies; torch itself is already there
  elif ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "setup: no NVIDIA GPU found; torch CPU build from $CPU_INDEX"
    "${PIP[@]}" --index-url "$CPU_INDEX" "$SPEC"
  else
    echo "setup: NVIDIA GPU found; torch from PyPI (CUDA build)"
    "${PIP[@]}" "$SPEC"
  fi
fi
.venv/bin/pip install --quiet -e ".[serve,report,tune,dev]"
