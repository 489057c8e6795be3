#!/usr/bin/env bash
# Interop suite: Microsoft's official Python SDK (azure-eventhub) against hubsend-testhub, with
# events produced by the hubsend CLI read back by the SDK's consumer.
#
# Creates a venv under target/interop-venv (PyPI is the only network access), builds the hub and
# the CLI, starts the hub on a free port, runs interop.py, stops the hub. Exits non-zero on any
# failure; the last line is `interop: N passed, M failed`.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

AZURE_EVENTHUB_VERSION="5.15.1"
VENV="$ROOT/target/interop-venv"
WORK="$ROOT/target/interop"
PYTHON_BIN="${PYTHON:-python3}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
mkdir -p "$WORK"

fail() {
  echo "interop: setup failed: $*" >&2
  echo "interop: 0 passed, 1 failed"
  exit 1
}

command -v "$PYTHON_BIN" >/dev/null 2>&1 || fail "python3 not found"

# 1. Python environment (reused when the pinned SDK is already there).
if ! "$VENV/bin/python" -c "import azure.eventhub, sys; sys.exit(azure.eventhub.__version__ != '$AZURE_EVENTHUB_VERSION')" 2>/dev/null; then
  rm -rf "$VENV"
  "$PYTHON_BIN" -m venv "$VENV" || fail "python3 -m venv failed (install python3-venv)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "azure-eventhub==$AZURE_EVENTHUB_VERSION" || fail "pip install azure-eventhub failed"
fi

# 2. Binaries.
cargo build --quiet -p hubsend-testhub --bin hubsend-testhub || fail "building hubsend-testhub failed"
cargo build --quiet -p hubsend-cli --bin hubsend || fail "building hubsend failed"
HUB_BIN="$CARGO_TARGET_DIR/debug/hubsend-testhub"
HUBSEND_BIN="$CARGO_TARGET_DIR/debug/hubsend"

# 3. The hub, on a free port, with a known key for the `manage` (Listen) policy.
MANAGE_KEY="$("$VENV/bin/python" -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')"
HUB_OUT="$WORK/hub.stdout"
HUB_LOG="$WORK/hub.log"
: >"$HUB_OUT"
RUST_LOG="${RUST_LOG:-hubsend_testhub=info}" "$HUB_BIN" --port 0 --policy-key "manage=$MANAGE_KEY" \
  >"$HUB_OUT" 2>"$HUB_LOG" &
HUB_PID=$!
cleanup() {
  if kill -0 "$HUB_PID" 2>/dev/null; then
    kill "$HUB_PID" 2>/dev/null || true
    wait "$HUB_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT

# Line 1: the send-only policy's connection string; line 2: the manage (Listen) policy's.
CS=""
LISTEN_CS=""
for _ in $(seq 1 100); do
  CS="$(sed -n 1p "$HUB_OUT" 2>/dev/null || true)"
  LISTEN_CS="$(sed -n 2p "$HUB_OUT" 2>/dev/null || true)"
  [ -n "$LISTEN_CS" ] && break
  kill -0 "$HUB_PID" 2>/dev/null || break
  sleep 0.1
done
[ -n "$LISTEN_CS" ] || { tail -n 50 "$HUB_LOG" >&2 || true; fail "the hub printed no connection strings"; }
# Read line 1 again: it may have been empty when the loop first looked, before line 2 existed.
CS="$(sed -n 1p "$HUB_OUT")"
case "$LISTEN_CS" in
  *"SharedAccessKeyName=manage;SharedAccessKey=$MANAGE_KEY;"*) ;;
  *) fail "the hub's second line is not the manage policy's connection string" ;;
esac
echo "interop: hub at ${CS%%;SharedAccessKey=*};..."

# 4. The checks (bounded, so a hang cannot stall CI).
STATUS=0
timeout 600 "$VENV/bin/python" "$ROOT/tests/interop/interop.py" \
  --connection-string "$CS" --listen-connection-string "$LISTEN_CS" --hubsend "$HUBSEND_BIN" \
  >"$WORK/interop.out" 2>&1 || STATUS=$?
# The SDK's own log lines are noise unless something failed.
if [ "$STATUS" -ne 0 ]; then
  cat "$WORK/interop.out"
  echo "--- hub log (last 80 lines) ---"
  tail -n 80 "$HUB_LOG" || true
  if ! tail -n 1 "$WORK/interop.out" | grep -q '^interop: '; then
    echo "interop: 0 passed, 1 failed (interop.py exited $STATUS)"
  fi
  exit 1
fi
grep -E '^(PASS|FAIL|  hubsend report|  sent |  read |interop:)' "$WORK/interop.out"

# 5. IoT Hub mode, judged by Microsoft's Node device SDK over AMQPS (azure-iot-device +
# azure-iot-device-amqp from npm, pinned): CBS answered 200, device SAS, the D2C link and the
# message mapping. The hub dumps what it stored; the script compares it with what it sent.
IOT_NODE="$ROOT/target/interop-node"
# A `SharedAccessSignature=` device connection string for device $2, signed with the policy of
# connection string $1 (tests/interop/iothub_policy_sas.js; $3 = --wrong-key signs with a
# random key).
policy_sas() {
  NODE_PATH="$IOT_NODE/node_modules" node "$ROOT/tests/interop/iothub_policy_sas.js" "$@"
}
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
  if [ ! -d "$IOT_NODE/node_modules/azure-iot-device-amqp" ]; then
    mkdir -p "$IOT_NODE"
    (cd "$IOT_NODE" && npm init -y >/dev/null 2>&1 && \
      npm install --no-audit --no-fund --silent azure-iot-device@1.18.4 azure-iot-device-amqp@1.14.4 >/dev/null) \
      || fail "npm install of Microsoft's IoT device SDK failed"
  fi
  IOT_DIR="$WORK/iothub"
  rm -rf "$IOT_DIR" && mkdir -p "$IOT_DIR"
  IOT_KEY="$("$VENV/bin/python" -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')"
  IOT_OWNER_KEY="$("$VENV/bin/python" -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')"
  IOT_REG_PORT="$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  RUST_LOG="${RUST_LOG:-hubsend_testhub=info}" "$HUB_BIN" --port 0 --iothub plant.azure-devices.net \
    --iot-device "node-device=$IOT_KEY" --iot-device "node-policy=$IOT_KEY" \
    --policy-key "iothubowner=$IOT_OWNER_KEY" \
    --iot-registry-port "$IOT_REG_PORT" --tls-dir "$IOT_DIR" --dump "$IOT_DIR/dump.json" \
    >"$IOT_DIR/hub.stdout" 2>"$IOT_DIR/hub.log" &
  IOT_PID=$!
  DEVICE_CS=""
  for _ in $(seq 1 100); do
    grep -q '^Built-in endpoint: ' "$IOT_DIR/hub.stdout" 2>/dev/null && break
    sleep 0.1
  done
  DEVICE_CS="$(sed -n 2p "$IOT_DIR/hub.stdout")"
  IOT_STATUS=0
  NODE_PATH="$IOT_NODE/node_modules" NODE_EXTRA_CA_CERTS="$IOT_DIR/ca.pem" \
    timeout 120 node "$ROOT/tests/interop/iothub_device.js" "$DEVICE_CS" "$IOT_DIR/dump.json" \
    >"$IOT_DIR/judge.out" 2>&1 || IOT_STATUS=$?
  # 5b. The built-in Event Hubs-compatible endpoint, judged by Microsoft's Python
  # EventHubConsumerClient (tests/interop/iothub_builtin.py): what the Node SDK just sent, and
  # what `hubsend iot send` sends as 20 devices through one gateway (creating them over the
  # registry, names from a field), each read back once under its device with IoT Hub's
  # iothub-* system properties. The hub's `Built-in endpoint:` line is the consumer's string.
  if [ "$IOT_STATUS" -eq 0 ]; then
    NODE_SENT="$(sed -n 's/^PASS.*: \([0-9]*\) sendEvent + \([0-9]*\) sendEventBatch.*/\1 + \2/p' "$IOT_DIR/judge.out")"
    BUILTIN_CS="$(sed -n 's/^Built-in endpoint: //p' "$IOT_DIR/hub.stdout")"
    IOT_AMQP_PORT="$(sed -n 1p "$IOT_DIR/hub.stdout" | grep -o 'GatewayHostName=[^;]*' | grep -o '[0-9]*$')"
    cat "$IOT_DIR/ca.pem" "$IOT_DIR/registry-ca.pem" >"$IOT_DIR/cas.pem"
    timeout 180 "$VENV/bin/python" "$ROOT/tests/interop/iothub_builtin.py" "$BUILTIN_CS" \
      --ca "$IOT_DIR/cas.pem" --node node-device --node-count "$((NODE_SENT))" \
      --hubsend "$HUBSEND_BIN" --endpoint "amqps://localhost:$IOT_AMQP_PORT" \
      --registry-url "https://localhost:$IOT_REG_PORT" --devices 20 --per-device 5 \
      --policy-cs "HostName=plant.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=$IOT_OWNER_KEY" \
      >>"$IOT_DIR/judge.out" 2>&1 || IOT_STATUS=$?
  fi
  # 5c. A policy-signed token: Microsoft's SAS builder (tests/interop/iothub_policy_sas.js)
  # signs a token for {host}/devices/node-policy with the `device` policy's key (line 1, skn
  # `device`), and the Node device SDK sends with it as a `SharedAccessSignature=` device
  # connection string (it dials the host in the token's sr, the test hub's localhost:PORT).
  # Then the refusals, each with the SDK error class it must end in: a policy token signed with
  # a wrong key and a device string with a wrong device key (UnauthorizedError: put-token 401),
  # a device the registry does not know (DeviceNotFoundError: attach amqp:not-found). The
  # disabled device is judged in the lifecycle (section 7), disabled over REST.
  if [ "$IOT_STATUS" -eq 0 ]; then
    IOT_POLICY_CS="$(sed -n 1p "$IOT_DIR/hub.stdout")"
    WRONG_KEY="$("$VENV/bin/python" -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')"
    iot_node() {
      NODE_PATH="$IOT_NODE/node_modules" NODE_EXTRA_CA_CERTS="$IOT_DIR/ca.pem" \
        timeout 60 node "$ROOT/tests/interop/iothub_device.js" "$1" "$IOT_DIR/dump.json" "${@:2}"
    }
    { iot_node "$(policy_sas "$IOT_POLICY_CS" node-policy)" \
        && iot_node "$(policy_sas "$IOT_POLICY_CS" node-policy --wrong-key)" \
          --refused "policy token with a wrong key" UnauthorizedError \
        && iot_node "$(policy_sas "$IOT_POLICY_CS" ghost-device)" \
          --refused "unknown device (policy token)" DeviceNotFoundError \
        && iot_node "$(echo "$DEVICE_CS" | sed "s#SharedAccessKey=[^;]*#SharedAccessKey=$WRONG_KEY#")" \
          --refused "wrong device key" UnauthorizedError; } >>"$IOT_DIR/judge.out" 2>&1 || IOT_STATUS=$?
  fi
  kill "$IOT_PID" 2>/dev/null || true
  wait "$IOT_PID" 2>/dev/null || true
  grep -E '^(PASS|FAIL|NOTE)' "$IOT_DIR/judge.out" || true
  if [ "$IOT_STATUS" -ne 0 ]; then
    cat "$IOT_DIR/judge.out"
    tail -n 40 "$IOT_DIR/hub.log" || true
    echo "interop: iothub judge failed"
    exit 1
  fi
else
  fail "node and npm are needed for the IoT Hub judge"
fi

# 6. IoT Hub registry and twin REST: Microsoft's azure-iot-hub IoTHubRegistryManager against the
# test hub's HTTPS registry (tests/interop/iothub_registry.py). The SDK goes through `requests`,
# so REQUESTS_CA_BUNDLE makes it trust the test hub's CA. `six` is pinned because azure-iot-hub
# 2.7.0 imports it without declaring it.
AZURE_IOT_HUB_VERSION="2.7.0"
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('azure-iot-hub') != '$AZURE_IOT_HUB_VERSION')" 2>/dev/null; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "azure-iot-hub==$AZURE_IOT_HUB_VERSION" "six==1.17.0" || fail "pip install azure-iot-hub failed"
fi
cargo build --quiet -p hubsend-testhub --example iothub_rest || fail "building the iothub_rest example failed"
REG_OUT="$WORK/iothub-rest.stdout"
: >"$REG_OUT"
"$CARGO_TARGET_DIR/debug/examples/iothub_rest" "$WORK/iothub-ca.pem" >"$REG_OUT" 2>"$WORK/iothub-rest.log" &
REG_PID=$!
trap 'cleanup; kill "$REG_PID" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  [ -n "$(sed -n 3p "$REG_OUT" 2>/dev/null || true)" ] && break
  kill -0 "$REG_PID" 2>/dev/null || break
  sleep 0.1
done
IOT_OWNER_CS="$(sed -n 1p "$REG_OUT")"
IOT_READ_CS="$(sed -n 2p "$REG_OUT")"
[ -n "$IOT_READ_CS" ] || fail "the IoT Hub REST server printed no connection strings"
REG_STATUS=0
REQUESTS_CA_BUNDLE="$WORK/iothub-ca.pem" timeout 120 "$VENV/bin/python" \
  "$ROOT/tests/interop/iothub_registry.py" "$IOT_OWNER_CS" "$IOT_READ_CS" \
  >"$WORK/iothub-registry.out" 2>&1 || REG_STATUS=$?
grep -E '^(PASS|FAIL|iothub-registry:)' "$WORK/iothub-registry.out" || cat "$WORK/iothub-registry.out"
[ "$REG_STATUS" -eq 0 ] || exit 1
# 6b. The same registry judged by Microsoft's Node azure-iothub `Registry` (npm, pinned; its own
# node_modules beside the device SDK's): create, get, create again (409 DeviceAlreadyExists),
# getTwin/updateTwin (stale etag 412), delete (tests/interop/iothub_registry.js).
IOT_NODE_HUB="$ROOT/target/interop-node-hub"
if [ ! -d "$IOT_NODE_HUB/node_modules/azure-iothub" ]; then
  mkdir -p "$IOT_NODE_HUB"
  (cd "$IOT_NODE_HUB" && npm init -y >/dev/null 2>&1 && \
    npm install --no-audit --no-fund --silent azure-iothub@1.16.6 >/dev/null) \
    || fail "npm install of Microsoft's azure-iothub failed"
fi
NODE_PATH="$IOT_NODE_HUB/node_modules" NODE_EXTRA_CA_CERTS="$WORK/iothub-ca.pem" timeout 120 \
  node "$ROOT/tests/interop/iothub_registry.js" "$IOT_OWNER_CS" \
  >"$WORK/iothub-registry-node.out" 2>&1 || REG_STATUS=$?
grep -E '^(PASS|FAIL|iothub-registry-node:)' "$WORK/iothub-registry-node.out" \
  || cat "$WORK/iothub-registry-node.out"
[ "$REG_STATUS" -eq 0 ] || exit 1

# 7. One device store for REST and AMQP: Microsoft's Python azure-iot-hub creates a device over
# the registry REST API, Microsoft's Node device SDK sends as it over AMQPS with the key the
# registry generated; disabled over REST it is refused, with its own key (put-token 401) and
# with a token signed by the iothubowner policy (attach amqp:not-found), and deleted it is
# refused again both ways. Both
# sides run in one test hub process (--iot-registry-port). The hub's HostName carries the
# registry's port because the Python SDK builds its URL from it.
LC_DIR="$WORK/iothub-lifecycle"
rm -rf "$LC_DIR" && mkdir -p "$LC_DIR"
REG_PORT="$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
OWNER_KEY="$("$VENV/bin/python" -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')"
RUST_LOG="${RUST_LOG:-hubsend_testhub=info}" "$HUB_BIN" --port 0 --iothub "localhost:$REG_PORT" \
  --iot-registry-port "$REG_PORT" --policy-key "iothubowner=$OWNER_KEY" --tls-dir "$LC_DIR" \
  --dump "$LC_DIR/dump.json" >"$LC_DIR/hub.stdout" 2>"$LC_DIR/hub.log" &
LC_PID=$!
trap 'cleanup; kill "$REG_PID" "$LC_PID" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  grep -q '^Registry: ' "$LC_DIR/hub.stdout" 2>/dev/null && break
  kill -0 "$LC_PID" 2>/dev/null || break
  sleep 0.1
done
grep -q '^Registry: ' "$LC_DIR/hub.stdout" || { tail -n 40 "$LC_DIR/hub.log"; fail "the IoT Hub with a registry did not start"; }
AMQP_GATEWAY="$(sed -n 1p "$LC_DIR/hub.stdout" | grep -o 'GatewayHostName=[^;]*')"
LC_OWNER_CS="HostName=localhost:$REG_PORT;SharedAccessKeyName=iothubowner;SharedAccessKey=$OWNER_KEY"
LC_DEVICE="judge-lifecycle-$("$VENV/bin/python" -c 'import uuid; print(uuid.uuid4().hex[:8])')"
lifecycle() {
  REQUESTS_CA_BUNDLE="$LC_DIR/registry-ca.pem" timeout 60 "$VENV/bin/python" \
    "$ROOT/tests/interop/iothub_lifecycle.py" "$LC_OWNER_CS" "$1" "$LC_DEVICE" 2>>"$LC_DIR/python.err"
}
node_device() {
  NODE_PATH="$IOT_NODE/node_modules" NODE_EXTRA_CA_CERTS="$LC_DIR/ca.pem" \
    timeout 60 node "$ROOT/tests/interop/iothub_device.js" "$LC_DEVICE_CS" "$LC_DIR/dump.json" "$@"
}
node_policy_token() {
  NODE_PATH="$IOT_NODE/node_modules" NODE_EXTRA_CA_CERTS="$LC_DIR/ca.pem" \
    timeout 60 node "$ROOT/tests/interop/iothub_device.js" \
    "$(policy_sas "$LC_OWNER_CS;$AMQP_GATEWAY" "$LC_DEVICE")" "$LC_DIR/dump.json" "$@"
}
LC_STATUS=0
LC_KEY="$(lifecycle create)" || { LC_STATUS=1; echo "$LC_KEY"; }
LC_DEVICE_CS="HostName=localhost:$REG_PORT;$AMQP_GATEWAY;DeviceId=$LC_DEVICE;SharedAccessKey=$LC_KEY"
if [ "$LC_STATUS" -eq 0 ]; then
  { node_device && lifecycle disable \
      && node_device --refused "disabled device" UnauthorizedError \
      && node_policy_token --refused "disabled device (policy token)" DeviceNotFoundError \
      && lifecycle delete && node_device --refused "deleted device" UnauthorizedError \
      && node_policy_token --refused "deleted device (policy token)" DeviceNotFoundError; } \
    >"$LC_DIR/judge.out" 2>&1 || LC_STATUS=$?
fi
kill "$LC_PID" 2>/dev/null || true
wait "$LC_PID" 2>/dev/null || true
cat "$LC_DIR/python.err" 2>/dev/null | grep -E '^(PASS|FAIL)' || true
grep -E '^(PASS|FAIL|NOTE)' "$LC_DIR/judge.out" 2>/dev/null || true
if [ "$LC_STATUS" -ne 0 ]; then
  cat "$LC_DIR/judge.out" "$LC_DIR/python.err" 2>/dev/null || true
  tail -n 40 "$LC_DIR/hub.log" || true
  echo "interop: iothub lifecycle judge failed"
  exit 1
fi
echo "interop: iothub lifecycle judge passed (REST create, AMQP send, disable, delete; device key and policy token)"


# 8. Idempotent publishing (#15), judged by Microsoft's JS EventHubBufferedProducerClient with
# enableIdempotentRetries, with and without a forced connection close mid-stream
# (tests/interop/js_idempotent.sh).
bash "$ROOT/tests/interop/js_idempotent.sh" "$HUB_BIN" "$WORK/js-idempotent"
