#!/usr/bin/env bash
# Many-partition-keys judge (#16): the hubsend CLI sends 10,000 distinct sensor ids with
# --partition-key-field, Microsoft's Python producer a sample of the same keys with
# partition_key=, and Microsoft's EventHubConsumerClient reads all 16 partitions back; every
# event must carry its key and sit on the partition the service's hash gives it, computed by
# tests/interop/keys.py on its own (see there).
#
# Uses the venv tests/interop/run.sh creates (run that first). A few seconds.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV="$ROOT/target/interop-venv"
WORK="$ROOT/target/interop/keys"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

fail() {
  echo "keys: setup failed: $*" >&2
  echo "keys: 0 passed, 1 failed"
  exit 1
}

"$VENV/bin/python" -c "import azure.eventhub" 2>/dev/null \
  || fail "no interop venv at $VENV with azure-eventhub (run tests/interop/run.sh first)"
cargo build --quiet -p hubsend-testhub --bin hubsend-testhub || fail "building hubsend-testhub failed"
cargo build --quiet -p hubsend-cli --bin hubsend || fail "building hubsend failed"

rm -rf "$WORK" && mkdir -p "$WORK"
MANAGE_KEY="$("$VENV/bin/python" -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')"
RUST_LOG="${RUST_LOG:-hubsend_testhub=info}" "$CARGO_TARGET_DIR/debug/hubsend-testhub" --port 0 \
  --partitions 16 --policy-key "manage=$MANAGE_KEY" >"$WORK/hub.stdout" 2>"$WORK/hub.log" &
HUB_PID=$!
trap 'kill "$HUB_PID" 2>/dev/null || true; wait "$HUB_PID" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  [ -n "$(sed -n 2p "$WORK/hub.stdout" 2>/dev/null || true)" ] && break
  kill -0 "$HUB_PID" 2>/dev/null || break
  sleep 0.1
done
CS="$(sed -n 1p "$WORK/hub.stdout")"
LISTEN_CS="$(sed -n 2p "$WORK/hub.stdout")"
[ -n "$LISTEN_CS" ] || { tail -n 40 "$WORK/hub.log" >&2 || true; fail "the hub printed no connection strings"; }

STATUS=0
timeout 180 "$VENV/bin/python" "$ROOT/tests/interop/keys.py" --connection-string "$CS" \
  --listen-connection-string "$LISTEN_CS" --hubsend "$CARGO_TARGET_DIR/debug/hubsend" \
  >"$WORK/judge.out" 2>&1 || STATUS=$?
if [ "$STATUS" -ne 0 ]; then
  cat "$WORK/judge.out"
  tail -n 40 "$WORK/hub.log" || true
  tail -n 1 "$WORK/judge.out" | grep -q '^keys: ' || echo "keys: 0 passed, 1 failed (keys.py exited $STATUS)"
  exit 1
fi
grep -E '^(PASS|FAIL|NOTE|  hubsend report|  sent |  read |keys:)' "$WORK/judge.out"
