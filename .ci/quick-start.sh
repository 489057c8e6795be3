#!/usr/bin/env bash
# Runs the README's quick start (examples/quick_start.rs, which tests/readme.rs keeps identical
# to the README's text) as pasted against a local test hub, and checks it finished.
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(realpath "${CARGO_TARGET_DIR:-target}")
cargo build --example quick_start
cargo build -p hubsend-testhub --bin hubsend-testhub
out=$(mktemp)
"$target/debug/hubsend-testhub" --port 0 >"$out" 2>/dev/null &
hub=$!
trap 'kill "$hub" 2>/dev/null || true; rm -f "$out"' EXIT
for _ in $(seq 100); do
  [ -s "$out" ] && break
  sleep 0.1
done
connection_string=$(head -n1 "$out")
case "$connection_string" in
  Endpoint=*) ;;
  *) echo "the test hub printed no connection string" >&2; exit 1 ;;
esac
result=$(EVENTHUB_CONNECTION_STRING="$connection_string" "$target/debug/examples/quick_start")
echo "$result"
grep -q "^10,001 events stored in telemetry$" <<<"$result"
echo "the README's quick start ran against the test hub"
