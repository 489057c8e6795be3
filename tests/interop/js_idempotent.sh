#!/usr/bin/env bash
# Judge of idempotent publishing (#15): Microsoft's JS EventHubBufferedProducerClient
# (@azure/event-hubs from npm, pinned) with enableIdempotentRetries sends 5,000 events to
# hubsend-testhub over plain AMQP (UseDevelopmentEmulator=true with the hub's port);
# eventhubs_idempotent.js reads them back with the same SDK's consumer, up to each partition's
# last enqueued sequence number, and checks every event was stored exactly once, in order per
# partition. Once as is, once with dispositions held 30 ms and every connection closed after
# 40 accepted deliveries (so stored but unacknowledged batches are resent and must be dropped
# as duplicates), under each of the hub's resume answers. Called by run.sh; standalone:
#   bash tests/interop/js_idempotent.sh HUB_BIN WORK_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
HUB_BIN="$1"
IDEM_DIR="$2"
fail() {
  echo "interop: js idempotent judge setup failed: $*" >&2
  exit 1
}
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || fail "node and npm are needed"
EH_NODE="$ROOT/target/interop-node-eventhubs"
EVENT_HUBS_JS_VERSION="5.12.2"
if [ "$(node -p "try { require('$EH_NODE/node_modules/@azure/event-hubs/package.json').version } catch (_) { '' }")" != "$EVENT_HUBS_JS_VERSION" ]; then
  rm -rf "$EH_NODE" && mkdir -p "$EH_NODE"
  (cd "$EH_NODE" && npm init -y >/dev/null 2>&1 && \
    npm install --no-audit --no-fund --silent "@azure/event-hubs@$EVENT_HUBS_JS_VERSION" >/dev/null) \
    || fail "npm install of @azure/event-hubs failed"
fi
rm -rf "$IDEM_DIR" && mkdir -p "$IDEM_DIR"
IDEM_COUNT=5000
IDEM_FAILED=0
# js_idempotent LABEL EXPECT_CLOSE MODE HUB_FLAGS...: one fresh hub, one judge run (MODE
# exactly-once or at-least-once, see eventhubs_idempotent.js), the hub's counters.
js_idempotent() {
  local label="$1" expect_close="$2" mode="$3"
  shift 3
  local dir="$IDEM_DIR/$label"
  mkdir -p "$dir"
  RUST_LOG="${RUST_LOG:-hubsend_testhub=info}" "$HUB_BIN" --port 0 --stats-file "$dir/stats.json" "$@" \
    >"$dir/hub.stdout" 2>"$dir/hub.log" &
  local pid=$!
  for _ in $(seq 1 100); do
    [ -n "$(sed -n 2p "$dir/hub.stdout" 2>/dev/null || true)" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  local status=0
  NODE_PATH="$EH_NODE/node_modules" timeout 120 node "$ROOT/tests/interop/eventhubs_idempotent.js" \
    "$(sed -n 1p "$dir/hub.stdout")" "$(sed -n 2p "$dir/hub.stdout")" "$IDEM_COUNT" "$label" "$mode" \
    >"$dir/judge.out" 2>&1 || status=$?
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  grep -E '^(PASS|FAIL|NOTE|  js-idempotent)' "$dir/judge.out" || true
  # Producer links beyond the 4 partitions' first attaches are re-attaches after the close.
  local stats links dups
  stats="$(cat "$dir/stats.json" 2>/dev/null || true)"
  [ -n "$stats" ] || { echo "FAIL js-idempotent $label: the hub wrote no stats (see its log)"; stats='{}'; status=1; }
  links="$(node -p "JSON.parse(process.argv[1]).producer_links_attached" "$stats")"
  dups="$(node -p "JSON.parse(process.argv[1]).idempotent_duplicates" "$stats")"
  echo "  js-idempotent $label: hub stats $stats"
  if [ "$expect_close" = yes ]; then
    if [ "$links" -gt 4 ] 2>/dev/null; then
      echo "PASS js-idempotent $label: the client re-attached after the forced close ($links producer links, $dups duplicates dropped)"
    else
      echo "FAIL js-idempotent $label: no re-attach seen ($links producer links): the close did not happen mid-stream"
      status=1
    fi
    # Exactly once through the close only means something if the close caught stored but
    # unacknowledged batches, which the resends must then have hit as duplicates.
    if [ "$mode" = exactly-once ]; then
      if [ "$dups" -gt 0 ] 2>/dev/null; then
        echo "PASS js-idempotent $label: resends of stored batches acknowledged as duplicates ($dups events)"
      else
        echo "FAIL js-idempotent $label: no resend hit a stored batch ($dups duplicates): the fault tested nothing"
        status=1
      fi
    fi
  elif [ "$links" = 4 ] && [ "$dups" = 0 ]; then
    echo "PASS js-idempotent $label: one link per partition, no duplicates to drop"
  else
    echo "FAIL js-idempotent $label: $links producer links, $dups duplicates dropped without a fault"
    status=1
  fi
  if [ "$status" -ne 0 ]; then
    cat "$dir/judge.out"
    tail -n 40 "$dir/hub.log" || true
    IDEM_FAILED=1
  fi
}
# The SDK re-attaches with the state it knows (its last acknowledged number) and numbers the
# resend from the reply: exactly once when the hub echoes that number, at least once (the
# unacknowledged batches stored twice) when it answers with the last number it stored.
CLOSE_FLAGS=(--disposition-delay-ms 30 --close-connections-after 40)
js_idempotent echo no exactly-once --idempotent-resume echo
js_idempotent echo-close yes exactly-once --idempotent-resume echo "${CLOSE_FLAGS[@]}"
js_idempotent stored no exactly-once --idempotent-resume stored
js_idempotent stored-close yes at-least-once --idempotent-resume stored "${CLOSE_FLAGS[@]}"
[ "$IDEM_FAILED" -eq 0 ] || { echo "interop: js idempotent judge failed"; exit 1; }
echo "interop: js idempotent judge passed (Microsoft's buffered producer, exactly once through a forced close)"
