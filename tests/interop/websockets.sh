#!/usr/bin/env bash
# WebSocket and proxy judges: Microsoft's azure-eventhub over AmqpOverWebsocket against the
# test hub's WebSocket listener (TLS), directly and through proxy.py (a real CONNECT proxy from
# PyPI) with Basic auth, a wrong proxy password refused (tests/interop/websockets.py); then
# Microsoft's Node IoT device SDK over AmqpWs against the IoT Hub-mode listener.
#
# Uses the venv and the Node modules tests/interop/run.sh creates (run that first) and adds to it the pinned
# websocket-client (the SDK's optional WebSocket dependency) and proxy.py; `.ci/run` then hands
# the venv's proxy script (target/interop-venv/bin/proxy) to `cargo test --test transport`.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

WEBSOCKET_CLIENT_VERSION="1.9.2"
PROXY_PY_VERSION="2.4.10"
VENV="$ROOT/target/interop-venv"
WORK="$ROOT/target/interop/websockets"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

fail() {
  echo "websockets: setup failed: $*" >&2
  echo "websockets: 0 passed, 1 failed"
  exit 1
}

"$VENV/bin/python" -c "import azure.eventhub" 2>/dev/null \
  || fail "no interop venv at $VENV with azure-eventhub (run tests/interop/run.sh first)"
if ! "$VENV/bin/python" -c "
import importlib.metadata as m, sys
sys.exit(m.version('websocket-client') != '$WEBSOCKET_CLIENT_VERSION' or m.version('proxy.py') != '$PROXY_PY_VERSION')
" 2>/dev/null; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "websocket-client==$WEBSOCKET_CLIENT_VERSION" "proxy.py==$PROXY_PY_VERSION" \
    || fail "pip install websocket-client proxy.py failed"
fi

cargo build --quiet -p hubsend-testhub --bin hubsend-testhub || fail "building hubsend-testhub failed"
HUB_BIN="$CARGO_TARGET_DIR/debug/hubsend-testhub"

rm -rf "$WORK" && mkdir -p "$WORK"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT

# Prints what "$@" prints once that is not empty, trying every 0.1 s for 10 s (a process
# started in the background writes it when it is ready).
first_output() {
  local out=""
  for _ in $(seq 1 100); do
    out="$("$@" 2>/dev/null || true)"
    [ -n "$out" ] && break
    sleep 0.1
  done
  printf '%s' "$out"
}

# The hub: TLS, with its WebSocket listener on a free port (the last stdout line names it).
RUST_LOG="${RUST_LOG:-hubsend_testhub=info}" "$HUB_BIN" --port 0 --tls-dir "$WORK" --ws-port 0 \
  >"$WORK/hub.stdout" 2>"$WORK/hub.log" &
PIDS+=($!)
WS_URL="$(first_output sed -n 's/^WebSocket: //p' "$WORK/hub.stdout")"
[ -n "$WS_URL" ] || { tail -n 40 "$WORK/hub.log" >&2 || true; fail "the hub printed no WebSocket URL"; }
CS="$(sed -n 1p "$WORK/hub.stdout")"
LISTEN_CS="$(sed -n 2p "$WORK/hub.stdout")"
WS_PORT="$("$VENV/bin/python" -c 'import sys, urllib.parse; print(urllib.parse.urlparse(sys.argv[1]).port)' "$WS_URL")"

# proxy.py with Basic auth, on a free port it writes to a file once it listens.
PROXY_USER="hubsend"
PROXY_PASSWORD="$("$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(12))')"
"$VENV/bin/proxy" --hostname 127.0.0.1 --port 0 --port-file "$WORK/proxy.port" \
  --num-workers 1 --num-acceptors 1 --basic-auth "$PROXY_USER:$PROXY_PASSWORD" \
  >"$WORK/proxy.log" 2>&1 &
PIDS+=($!)
PROXY_PORT="$(first_output cat "$WORK/proxy.port")"
[ -n "$PROXY_PORT" ] || { cat "$WORK/proxy.log" >&2 || true; fail "proxy.py did not start"; }
echo "websockets: hub WebSocket listener $WS_URL, proxy.py on 127.0.0.1:$PROXY_PORT"

STATUS=0
timeout 300 "$VENV/bin/python" "$ROOT/tests/interop/websockets.py" \
  --connection-string "$CS" --listen-connection-string "$LISTEN_CS" --ws-url "$WS_URL" \
  --ca "$WORK/ca.pem" --proxy-port "$PROXY_PORT" --proxy-user "$PROXY_USER" \
  --proxy-password "$PROXY_PASSWORD" >"$WORK/judge.out" 2>&1 || STATUS=$?
# proxy.py logs each tunnel as it closes: the proxied checks must have used it.
TUNNELS="$(grep -c "CONNECT localhost:$WS_PORT " "$WORK/proxy.log" || true)"
if [ "$STATUS" -ne 0 ] || [ "$TUNNELS" -lt 1 ]; then
  cat "$WORK/judge.out"
  echo "--- proxy.py log (last 20 lines) ---"; tail -n 20 "$WORK/proxy.log" || true
  echo "--- hub log (last 60 lines) ---"; tail -n 60 "$WORK/hub.log" || true
  [ "$TUNNELS" -ge 1 ] || echo "websockets: proxy.py logged no tunnel to the hub"
  if ! tail -n 1 "$WORK/judge.out" | grep -q '^websockets: '; then
    echo "websockets: 0 passed, 1 failed (websockets.py exited $STATUS)"
  fi
  exit 1
fi
grep -E '^(PASS|FAIL|  refused|websockets:)' "$WORK/judge.out"
echo "websockets: proxy.py logged $TUNNELS tunnels to the hub"

# IoT Hub over WebSockets, judged by Microsoft's Node device SDK (AmqpWs, installed by run.sh).
# AmqpWs always dials wss://GATEWAY:443/$iothub/websocket, so this hub's WebSocket listener
# binds 127.0.0.1:443 (CI runs as root); elsewhere, without the right to bind it, this part
# says so and is skipped.
IOT_NODE="$ROOT/target/interop-node"
[ -d "$IOT_NODE/node_modules/azure-iot-device-amqp" ] || fail "no Node IoT device SDK in $IOT_NODE (run tests/interop/run.sh first)"
IOT_DIR="$WORK/iothub"
mkdir -p "$IOT_DIR"
IOT_KEY="$("$VENV/bin/python" -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')"
RUST_LOG="${RUST_LOG:-hubsend_testhub=info}" "$HUB_BIN" --host 127.0.0.1 --port 0 --ws-port 443 \
  --iothub plant.azure-devices.net --iot-device "node-ws=$IOT_KEY" --tls-dir "$IOT_DIR" \
  --dump "$IOT_DIR/dump.json" >"$IOT_DIR/hub.stdout" 2>"$IOT_DIR/hub.log" &
IOT_PID=$!
PIDS+=($IOT_PID)
IOT_WS_URL="$(first_output sed -n 's/^WebSocket: //p' "$IOT_DIR/hub.stdout")"
if [ -z "$IOT_WS_URL" ] && [ "${CI:-}" != "true" ] && ! kill -0 "$IOT_PID" 2>/dev/null; then
  echo "SKIPPED iothub node device SDK (AmqpWs): cannot bind 127.0.0.1:443 here ($(tail -n 1 "$IOT_DIR/hub.log"))"
  exit 0
fi
[ -n "$IOT_WS_URL" ] || { tail -n 20 "$IOT_DIR/hub.log" >&2 || true; fail "the IoT Hub-mode hub did not start on 127.0.0.1:443"; }
# The device's connection string names the gateway without a port: AmqpWs adds :443.
DEVICE_CS="$(sed -n 2p "$IOT_DIR/hub.stdout" | sed 's/GatewayHostName=localhost:[0-9]*/GatewayHostName=localhost/')"
if ! NODE_PATH="$IOT_NODE/node_modules" NODE_EXTRA_CA_CERTS="$IOT_DIR/ca.pem" \
  timeout 120 node "$ROOT/tests/interop/iothub_device.js" "$DEVICE_CS" "$IOT_DIR/dump.json" --websockets \
  >"$IOT_DIR/judge.out" 2>&1; then
  { cat "$IOT_DIR/judge.out"; tail -n 40 "$IOT_DIR/hub.log"; } || true
  echo "websockets: the IoT Hub AmqpWs judge failed"
  exit 1
fi
grep -E '^(PASS|FAIL|NOTE)' "$IOT_DIR/judge.out" || true
