#!/usr/bin/env bash
# Fuzz the HTTP API with the full budget: the schemathesis CLI against a real `deepfm serve` (2 workers, admin
# token set) on a freshly trained small bundle, from the server's own OpenAPI spec, in three runs:
#   1. the spec as served, every operation, no token (POST /admin/reload answers 401);
#   2. POST /admin/reload with the admin token (reloads really run, with generated bundle paths);
#   3. POST /v1/predict with the model's input fields as each row's properties, so values reach the encoder.
# Every check runs except positive_data_acceptance: a row's required fields come from the bundle loaded at run
# time, which the static spec cannot state, so schema-valid rows without them are rightly a 422.
# Prints the cases tried and the server errors (5xx, dropped connections, tracebacks in the server log) and exits
# non-zero on any server error or other check failure. tests/test_fuzz_api.py is the small CI budget.
#
#   scripts/fuzz_api.sh                          # 1000 examples per operation and run
#   MAX_EXAMPLES=200 SEED=7 KEEP=1 scripts/fuzz_api.sh   # KEEP: leave the work folder (bundle, logs, reports)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
ST="$(dirname "$PY")/st"
[ -x "$ST" ] || ST=st
MAX_EXAMPLES=${MAX_EXAMPLES:-1000}
SEED=${SEED:-$RANDOM}
TOKEN="fuzz-$RANDOM$RANDOM"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/deepfm-fuzz.XXXXXX")
SERVER=""
cleanup() {
  if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; fi
  if [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; else echo "kept $WORK"; fi
}
trap cleanup EXIT

echo "== a small bundle (6,000 synthetic Criteo rows, 1 epoch) in $WORK"
"$PY" -m deepfm.cli synth --rows 6000 --seed 1 --vocab-scale 0.01 --out "$WORK/data" >/dev/null
"$PY" -m deepfm.cli train --format criteo --train "$WORK/data/train.tsv" --valid "$WORK/data/valid.tsv" \
  --out "$WORK/bundle" --seed 5 --epochs 1 --batch-size 256 --quiet --set "model.hidden=[32,32]" >/dev/null

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
"$PY" -m deepfm.cli serve "$WORK/bundle" --port "$PORT" --workers 2 --max-rows 50 --max-body-mb 0.05 \
  --admin-token "$TOKEN" --log-level warning >"$WORK/server.log" 2>&1 &
SERVER=$!
healthy() { "$PY" -c "import urllib.request as u; u.urlopen('$URL/healthz', timeout=1)" 2>/dev/null; }
for _ in $(seq 600); do
  healthy && break
  kill -0 "$SERVER" 2>/dev/null || break
  sleep 0.2
done
healthy || { echo "the server did not start:"; cat "$WORK/server.log"; exit 1; }
sleep 1  # both workers up
echo "== serving on $URL; seed $SEED, $MAX_EXAMPLES examples per operation and run"

# run 3's spec: the served one, predict only, each row with the model's inputs (and any other field, ignored)
"$PY" - "$URL" "$WORK/typed.json" <<'EOF'
import json, sys, urllib.request
url, out = sys.argv[1:]
spec = json.load(urllib.request.urlopen(url + "/openapi.json"))
inputs = json.load(urllib.request.urlopen(url + "/v1/metadata"))["inputs"]
op = spec["paths"]["/v1/predict"]
item = op["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]["rows"]["items"]
item.update(properties={name: item["additionalProperties"] for name in inputs}, required=inputs,
            additionalProperties=True)
spec["paths"] = {"/v1/predict": op}
json.dump(spec, open(out, "w"))
EOF

# invalid data may also be rejected as too large: 413 (documented) counts as a rejection
cat >"$WORK/schemathesis.toml" <<'EOF'
[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]
EOF
COMMON=(--checks all --exclude-checks positive_data_acceptance --max-examples "$MAX_EXAMPLES" --seed "$SEED"
        --continue-on-failure --workers 2 --request-timeout 60 --no-color --generation-database none
        --report json --report-dir "$WORK/reports")
run() {  # name, then schemathesis arguments
  local name=$1
  shift
  echo "== run: $name"
  "$ST" --config-file "$WORK/schemathesis.toml" run "$@" "${COMMON[@]}" \
    --report-json-path "$WORK/reports/$name.json" >"$WORK/$name.out" 2>&1 || true
  tail -n 25 "$WORK/$name.out"
}
run served "$URL/openapi.json"
run reload "$URL/openapi.json" --include-path /admin/reload -H "Authorization: Bearer $TOKEN"
run typed "$WORK/typed.json" --url "$URL"

"$PY" - "$WORK" "$URL" "$SERVER" <<'EOF'
import json, os, sys, urllib.request
from pathlib import Path
work, url, pid = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cases = server_errors = other = 0
for name in ("served", "reload", "typed"):
    p = work / "reports" / f"{name}.json"
    if not p.exists():
        print(f"{name}: no report (schemathesis failed to run):\n" + (work / f"{name}.out").read_text()[-3000:])
        sys.exit(1)
    r = json.loads(p.read_text())
    n = r["test_cases"]["generated"]
    fivexx = sum(f["count"] for f in r["failures"] if f["type"] in ("ServerError", "ContentTypeServerError"))
    rest = sum(f["count"] for f in r["failures"]) - fivexx
    errors = len(r["errors"])  # network errors: a dropped connection or a timeout
    print(f"{name}: {n} cases, {fivexx} server errors, {errors} network errors, {rest} other check failures "
          + ", ".join(f"{f['code']} {f['title']} x{f['count']}" for f in r["failures"]))
    cases, server_errors, other = cases + n, server_errors + fivexx + errors, other + rest
log = (work / "server.log").read_text(errors="replace")
tracebacks = log.count("Traceback")
try:
    health = urllib.request.urlopen(url + "/healthz", timeout=10).status
except OSError as e:
    health = repr(e)
alive = os.path.exists(f"/proc/{pid}")
server_errors += tracebacks + (health != 200) + (not alive)
print(f"server log tracebacks: {tracebacks}; /healthz after: {health}; server alive: {alive}")
print(f"TOTAL: {cases} cases tried, {server_errors} server errors, {other} other check failures")
sys.exit(1 if server_errors else 2 if other else 0)
EOF
