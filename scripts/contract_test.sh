#!/usr/bin/env bash
# API contract check: schemathesis (`st run --checks all`) against `lumen
# serve` on the embedded model, on a free loopback port, for a bounded time.
# The run passes with 0 failures and 0 server errors.
#
#   scripts/contract_test.sh [SECONDS]        (default 300)
#
# The server runs with small request limits (steps, output side, images) so
# that every schema-valid request finishes in well under the request timeout:
# the run measures the contract, not the CPU. The served /openapi.json states
# those limits, so schemathesis draws within them. With LIMITS=default the
# server runs with its default limits and request timeout instead (requests
# too costly for the timeout are refused up front with 422, so none times
# out; scripts/contract/default-limits.toml then counts that 422 as an
# answer to valid data). Environment: VENV (the
# Python venv, default scripts/.cache/contract-venv), LUMEN (a built binary,
# default: cargo build --release), ST_ARGS (more `st run` options).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-300}
VENV=$(realpath -m "${VENV:-scripts/.cache/contract-venv}")
OUT=${OUT:-scripts/.cache/contract}
mkdir -p "$OUT"

if [ ! -x "$VENV/bin/st" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet 'schemathesis>=4.32,<5' 'pillow>=10,<13'
fi
if [ -z "${LUMEN:-}" ]; then
    cargo build --release --locked --quiet
    LUMEN=target/release/lumen
fi

LOG="$OUT/server.log"
ST_CONFIG=()
if [ "${LIMITS:-small}" = default ]; then
    LIMIT_FLAGS=()
    # A valid request may take up to the request timeout: that is not a time-out.
    ST_TIMEOUT=330
    ST_ARGS="--max-response-time 330 ${ST_ARGS:-}"
    # ...and one that would not fit is refused with 422 over_time_budget.
    ST_CONFIG=(--config-file "$(pwd)/scripts/contract/default-limits.toml")
else
    LIMIT_FLAGS=(--max-steps 4 --max-side 64 --max-images 2 --max-layout-size 256
        --max-queue 64 --request-timeout-s 120)
    ST_TIMEOUT=110
    # A small request still waits for the jobs queued ahead of it (the
    # stateful phase queues many): schemathesis' default 10 s is not the
    # contract, the request timeout is.
    ST_ARGS="--max-response-time 110 ${ST_ARGS:-}"
fi
# DELETE /jobs/{id} cancels a job and keeps its final status readable (the
# documented contract), so `use_after_free` (GET after DELETE must be 404)
# does not apply.
ST_ARGS="--exclude-checks use_after_free ${ST_ARGS:-}"
"$LUMEN" serve --host 127.0.0.1 --port 0 --log-format json "${LIMIT_FLAGS[@]}" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT

ADDR=""
for _ in $(seq 1 600); do
    ADDR=$(sed -n 's/.*"message":"listening","address":"\([^"]*\)".*/\1/p' "$LOG" | head -n1)
    if [ -n "$ADDR" ] && curl -sf "http://$ADDR/ready" >/dev/null; then break; fi
    if ! kill -0 $SERVER 2>/dev/null; then cat "$LOG"; echo "lumen serve exited" >&2; exit 1; fi
    sleep 0.1
done
[ -n "$ADDR" ] || { echo "lumen serve never became ready" >&2; exit 1; }
BASE="http://$ADDR"
echo "lumen serve ready at $BASE; running schemathesis for ${DURATION}s"

# Server errors are counted from here on (loading answered /ready with 503).
count_5xx() { curl -sf "$BASE/metrics" | awk '/^lumen_http_requests_total/ && /status="5/ {s += $NF} END {print s + 0}'; }
ERRORS_BEFORE=$(count_5xx)
START=$(date +%s)
set +e
# st keeps its own state (.schemathesis/, for `st replay`) in the working
# directory: run it in $OUT.
ROOT=$(pwd)
(cd "$OUT" && PYTHONPATH="$ROOT/scripts/contract" SCHEMATHESIS_HOOKS=lumen_hooks \
    "$VENV/bin/st" "${ST_CONFIG[@]}" run "$BASE/openapi.json" \
    --checks all --max-time "$DURATION" --request-timeout "$ST_TIMEOUT" --workers 1 \
    --report junit --report-dir . ${ST_ARGS:-}) | tee "$OUT/st.txt"
STATUS=${PIPESTATUS[0]}
set -e
ELAPSED=$(( $(date +%s) - START ))

SERVER_ERRORS=$(( $(count_5xx) - ERRORS_BEFORE ))
REQUESTS=$(curl -sf "$BASE/metrics" | awk '/^lumen_http_requests_total/ {s += $NF} END {print s + 0}')
echo "requests by endpoint and status (whole run):"
curl -sf "$BASE/metrics" | sed -n 's/^lumen_http_requests_total{\(.*\)} \([0-9]*\)$/  \1 \2/p' | sort
kill -TERM $SERVER
wait $SERVER || { echo "lumen serve did not exit cleanly" >&2; STATUS=1; }
trap - EXIT
if grep -q panicked "$LOG"; then echo "the server panicked (see $LOG)" >&2; STATUS=1; fi
echo "contract run: ${ELAPSED}s, ${REQUESTS} requests served, ${SERVER_ERRORS} server errors, st exit ${STATUS}"
[ "$SERVER_ERRORS" = 0 ] || STATUS=1
exit $STATUS
