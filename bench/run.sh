#!/usr/bin/env bash
# Builds the test hub, the bench example and the comparison peers (release), then runs the full
# comparison: hubsend vs Microsoft's azure_messaging_eventhubs vs a raw fe2o3-amqp ceiling, over
# plain and TLS loopback, for 100-byte and 1 KiB events. Output is saved under bench/results/.
#
#   bench/run.sh                 # defaults below
#   EVENTS=4000000 bench/run.sh  # more events per batched run
#   NO_PEERS=1 bench/run.sh      # hubsend only (skips building the official crate)
#   STEADY=0 bench/run.sh        # skip the 60 s steady-state memory run
#   CLI_LINES=1000000 bench/run.sh  # lines in the `hubsend send` file (default EVENTS)
#   bench/run.sh rtt             # far from the hub: TLS through a delay proxy at 0, 5, 20 and
#                                # 50 ms round-trip time, each point twice (RTTS=0,20 REPEAT=3
#                                # to change); saved as bench/results/rtt-*.txt
set -euo pipefail
cd "$(dirname "$0")/.."
# The build stays inside the project (the workspace's own `target/`) unless CARGO_TARGET_DIR
# says otherwise; the peers in bench-peers/ build into the same directory.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
EVENTS="${EVENTS:-2000000}"
EVENTS_1K="${EVENTS_1K:-500000}"
STEADY="${STEADY:-60}"   # seconds of full-speed 100-byte streaming with RSS sampled (0: skip)

cargo build --release -p hubsend-testhub
cargo build --release -p hubsend-cli   # `hubsend send` for the cli rows (--mode all, 100 B)
cargo build --release --features websockets,https --example bench
PEERS_ARG=()
if [[ -z "${NO_PEERS:-}" ]]; then
    (cd bench-peers && cargo build --release --locked)
else
    PEERS_ARG=(--no-peers)
fi

mkdir -p bench/results
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
header() {
    echo "# hubsend bench $stamp  commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "# $(nproc) cores, $(uname -sr), $(rustc --version), load average $(cut -d' ' -f1-3 /proc/loadavg)"
}
if [[ "${1:-}" == rtt ]]; then
    shift
    out="bench/results/rtt-$stamp.txt"
    {
        header
        echo
        echo "## 100-byte telemetry events over TLS, RTT ${RTTS:-0,5,20,50} ms, ${REPEAT:-2} runs each"
        "$CARGO_TARGET_DIR/release/examples/bench" --tls --rtt-ms "${RTTS:-0,5,20,50}" \
            --repeat "${REPEAT:-2}" --mode batch,single,buffered,latency --payload-bytes 100 \
            --events "${RTT_EVENTS:-4000000}" --single-events "${RTT_SINGLE_EVENTS:-1000000}" \
            --latency-events 200 --latency-warmup 20 --json \
            --official-single-events 200 --official-latency-events 100 "${PEERS_ARG[@]}" "$@"
    } 2>&1 | tee "$out"
    echo "saved to $out"
    exit 0
fi
out="bench/results/bench-$stamp.txt"
{
    header
    echo
    echo "## 100-byte telemetry events"
    "$CARGO_TARGET_DIR/release/examples/bench" --both --payload-bytes 100 --events "$EVENTS" --cli-lines "${CLI_LINES:-$EVENTS}" --steady-seconds "$STEADY" "${PEERS_ARG[@]}" "$@"
    echo
    echo "## 1 KiB events"
    "$CARGO_TARGET_DIR/release/examples/bench" --both --payload-bytes 1024 --events "$EVENTS_1K" "${PEERS_ARG[@]}" "$@"
} 2>&1 | tee "$out"
echo "saved to $out"
