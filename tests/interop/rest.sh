#!/usr/bin/env bash
# REST judge: curl (with SAS tokens signed by a few independent lines of Python) against the
# test hub's Event Hubs REST endpoint, and Microsoft's azure-eventhub consumer reading back what
# it stored. Reuses the interop venv that tests/interop/run.sh creates (run that first).
# Last line: `rest-judge: N passed, M failed`.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

AZURE_EVENTHUB_VERSION="5.15.1"
VENV="${INTEROP_VENV:-$ROOT/target/interop-venv}"
WORK="$ROOT/target/interop/rest"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
mkdir -p "$WORK"

fail() {
  echo "rest-judge: setup failed: $*" >&2
  echo "rest-judge: 0 passed, 1 failed"
  exit 1
}

command -v curl >/dev/null 2>&1 || fail "curl not found"
# The venv tests/interop/run.sh made (.ci/run runs that first).
"$VENV/bin/python" -c "import azure.eventhub, sys; sys.exit(azure.eventhub.__version__ != '$AZURE_EVENTHUB_VERSION')" 2>/dev/null \
  || fail "no azure-eventhub $AZURE_EVENTHUB_VERSION in $VENV: run tests/interop/run.sh first"

cargo build --quiet -p hubsend-testhub --bin hubsend-testhub || fail "building hubsend-testhub failed"
cargo build --quiet -p hubsend-cli --bin hubsend || fail "building hubsend failed"

KEY_GEN='import base64, os; print(base64.b64encode(os.urandom(32)).decode())'
SEND_KEY="$("$VENV/bin/python" -c "$KEY_GEN")"
MANAGE_KEY="$("$VENV/bin/python" -c "$KEY_GEN")"
MAX=65536
: >"$WORK/hub.stdout"
RUST_LOG="${RUST_LOG:-hubsend_testhub=info}" "$CARGO_TARGET_DIR/debug/hubsend-testhub" --port 0 --rest \
  --max-message-size "$MAX" --policy-key "send-only=$SEND_KEY" --policy-key "manage=$MANAGE_KEY" \
  >"$WORK/hub.stdout" 2>"$WORK/hub.log" &
HUB_PID=$!
trap 'kill "$HUB_PID" 2>/dev/null || true; wait "$HUB_PID" 2>/dev/null || true' EXIT
REST_URL=""
for _ in $(seq 1 100); do
  REST_URL="$(sed -n 's/^REST endpoint: //p' "$WORK/hub.stdout" 2>/dev/null || true)"
  [ -n "$REST_URL" ] && break
  kill -0 "$HUB_PID" 2>/dev/null || break
  sleep 0.1
done
[ -n "$REST_URL" ] || { tail -n 40 "$WORK/hub.log" >&2 || true; fail "the hub printed no REST endpoint"; }
LISTEN_CS="$(sed -n 2p "$WORK/hub.stdout")"
echo "rest-judge: REST endpoint $REST_URL"

STATUS=0
timeout 300 "$VENV/bin/python" "$ROOT/tests/interop/rest_judge.py" --rest-url "$REST_URL" \
  --send-key "$SEND_KEY" --listen-connection-string "$LISTEN_CS" \
  --hubsend "$CARGO_TARGET_DIR/debug/hubsend" --max-message-size "$MAX" \
  >"$WORK/judge.out" 2>&1 || STATUS=$?
grep -E '^(PASS|FAIL|rest-judge:)' "$WORK/judge.out" || true
if [ "$STATUS" -ne 0 ]; then
  cat "$WORK/judge.out"
  tail -n 60 "$WORK/hub.log" || true
  exit 1
fi
