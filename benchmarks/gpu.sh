#!/usr/bin/env bash
# GPU benchmark (issue 19), one prepared script for a machine with CUDA, within 8 minutes:
#   1. exits at once, with a message, when CUDA is absent (benchmarks/gpu.py check; exit 3);
#   2. `deepfm synth`: 4M synthetic Criteo-format rows (2.8M train / 200k valid / 1M test), kept in $DATA;
#   3. benchmarks/gpu.py run: the paper config, 1 epoch, at batch 4096, 16384 and 65536 in fp32 and bf16;
#      scoring 1M rows; CPU/GPU parity on a bundle; a CPU fp32 reference run for the AUC target.
# Output: one JSON line per measurement on stdout (progress on stderr), e.g.
#   bash benchmarks/gpu.sh | tee gpu-results.jsonl
# Environment: DATA (default /tmp/deepfm-gpu-bench), ROWS (4000000), BUDGET_S (seconds after which gpu.py
# starts no new step; default 420), PYTHON (default .venv/bin/python, else python3). Extra arguments go to
# `gpu.py run` (e.g. --batches 65536 --precisions bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
DATA="${DATA:-/tmp/deepfm-gpu-bench}"
ROWS="${ROWS:-4000000}"
BUDGET_S="${BUDGET_S:-420}"
START=$(date +%s)

"$PY" benchmarks/gpu.py check >&2 || exit $?

if [ ! -f "$DATA/test.tsv" ] || [ "$(cat "$DATA/.rows" 2>/dev/null)" != "$ROWS" ]; then
  echo "[gpu.sh] deepfm synth: $ROWS rows into $DATA" >&2
  rm -rf "$DATA"
  "$PY" -m deepfm synth --rows "$ROWS" --seed 0 --valid-fraction 0.05 --test-fraction 0.25 --out "$DATA" >&2
  echo "$ROWS" > "$DATA/.rows"
fi
SYNTH_S=$(( $(date +%s) - START ))
echo "{\"measure\": \"synth\", \"rows\": $ROWS, \"seconds\": $SYNTH_S}"

# what is left of 8 minutes goes to gpu.py: its budget (no new step after it) and a hard stop
LEFT=$(( 480 - SYNTH_S ))
[ "$LEFT" -gt 30 ] || LEFT=30
STEP_BUDGET=$(( BUDGET_S - SYNTH_S ))
[ "$STEP_BUDGET" -gt 30 ] || STEP_BUDGET=30
timeout --signal=INT "$LEFT" "$PY" benchmarks/gpu.py run --data "$DATA" --budget-s "$STEP_BUDGET" "$@"
