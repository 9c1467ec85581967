#!/usr/bin/env bash
# Create the virtual environment used by benchmarks/peers/run_peer.py.
#
# Usage: benchmarks/peers/setup_peers.sh [VENV_DIR]   (default: benchmarks/.peers-venv)
#
# Installs the CPU build of torch==2.13.0 first, then the peer libraries with a
# constraints file pinning torch, so pip can never swap in a (multi-GB) CUDA
# build.  Idempotent: if the venv already imports every peer at the pinned
# version, nothing is done.  Set PEERS_FORCE=1 to reinstall anyway.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-$repo/benchmarks/.peers-venv}"
python_bin="${PYTHON:-python3}"

TORCH_VERSION="2.13.0"
DEEPCTR_VERSION="0.3.0"
TORCHFM_VERSION="0.7.0"
FUXICTR_VERSION="2.3.10"
RECHUB_VERSION="0.9.0"

check() {
    "$venv/bin/python" - "$TORCH_VERSION" "$DEEPCTR_VERSION" "$TORCHFM_VERSION" "$FUXICTR_VERSION" "$RECHUB_VERSION" <<'PY'
import sys
from importlib.metadata import version

want = dict(zip(["torch", "deepctr-torch", "torchfm", "fuxictr", "torch-rechub"], sys.argv[1:]))
for dist, ver in want.items():
    got = version(dist)
    if got.split("+")[0] != ver:
        sys.exit(f"{dist}: have {got}, want {ver}")
import deepctr_torch.models  # noqa: E402,F401
import fuxictr.pytorch.layers  # noqa: E402,F401
import fuxictr.preprocess  # noqa: E402,F401
import torchfm.model.dfm  # noqa: E402,F401
import torch_rechub.models.ranking  # noqa: E402,F401
if int(version("polars").split(".")[0]) >= 2:
    sys.exit("polars>=2 breaks fuxictr 2.3.10 (scan_csv(dtypes=...))")
print("peers venv ok:", {d: version(d) for d in want})
PY
}

if [[ -x "$venv/bin/python" && "${PEERS_FORCE:-0}" != "1" ]] && check 2>/dev/null; then
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
constraints="$venv/peers-constraints.txt"
echo "torch==$TORCH_VERSION" > "$constraints"

"${pip[@]}" install --upgrade pip setuptools wheel
# polars<2: fuxictr 2.3.10 calls pl.scan_csv(dtypes=...), a keyword polars 2 removed.
# CPU build: torch 2.13.0 lies on local disk; any other version would pull CUDA wheels.
"${pip[@]}" install "torch==$TORCH_VERSION"
"${pip[@]}" install -c "$constraints" \
    numpy pandas scikit-learn tqdm "polars<2" \
    "deepctr-torch==$DEEPCTR_VERSION" \
    "torchfm==$TORCHFM_VERSION" \
    "fuxictr==$FUXICTR_VERSION" \
    "torch-rechub==$RECHUB_VERSION"

check
