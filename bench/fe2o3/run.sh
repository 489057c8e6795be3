#!/usr/bin/env bash
# Before/after for the fe2o3 patch (#16): hubsend on the published fe2o3-amqp 0.18.4 against
# hubsend built with `--cfg hubsend_fe2o3_payload` on fe2o3-amqp 0.18.4 + the patch beside this
# script (`Sender::send_batchable_payload`: plain messages go out as one encoded `Bytes` that the
# link's ledger shares with fe2o3's unsettled map).
#
#   bench/fe2o3/run.sh              # build both, then batch/buffered/single, plain + TLS,
#                                   # before/after alternated, ROUNDS times (default 2)
#   BUILD_ONLY=1 bench/fe2o3/run.sh
#   EXTRA="--max-in-flight-bytes 16777216" bench/fe2o3/run.sh    # extra bench arguments
#   RTT=1 bench/fe2o3/run.sh        # also TLS batch through the delay proxy, --rtt-ms 0,20
#
# Everything is written inside the project and its target dir: the patched crate is a copy of
# the registry's under "$CARGO_TARGET_DIR/fe2o3/", the patched build goes to
# "$CARGO_TARGET_DIR/fe2o3-payload/", and Cargo.lock is restored if cargo rewrites it (the
# `[patch]` is given on the command line, never written into Cargo.toml). Output: one file
# under bench/results/ per run of this script.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
ROUNDS="${ROUNDS:-2}"
EVENTS="${EVENTS:-2000000}"
SINGLE_EVENTS="${SINGLE_EVENTS:-500000}"
MODES="${MODES:-batch,buffered,single}"
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"

registry=""
for dir in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/fe2o3-amqp-0.18.4; do
    [[ -d "$dir" ]] && registry="$dir"
done
if [[ -z "$registry" ]]; then
    cargo fetch --locked >/dev/null
    for dir in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/fe2o3-amqp-0.18.4; do
        [[ -d "$dir" ]] && registry="$dir"
    done
fi
[[ -n "$registry" ]] || { echo "fe2o3-amqp 0.18.4 is not in the cargo registry" >&2; exit 1; }

patched="$CARGO_TARGET_DIR/fe2o3/fe2o3-amqp-0.18.4"
applied="$CARGO_TARGET_DIR/fe2o3/applied.patch"
# A fresh copy only when the patch changed: a new copy has new mtimes, and cargo would rebuild
# the patched crate and everything above it.
if ! cmp -s bench/fe2o3/fe2o3-amqp-0.18.4-send-payload.patch "$applied"; then
    rm -rf "$patched" "$applied"
    mkdir -p "$(dirname "$patched")"
    cp -r "$registry" "$patched"
    chmod -R u+w "$patched"
    patch -s -d "$patched" -p1 < bench/fe2o3/fe2o3-amqp-0.18.4-send-payload.patch
    cp bench/fe2o3/fe2o3-amqp-0.18.4-send-payload.patch "$applied"
fi

cp Cargo.lock "$CARGO_TARGET_DIR/fe2o3/Cargo.lock.orig"
restore_lock() { cp "$CARGO_TARGET_DIR/fe2o3/Cargo.lock.orig" Cargo.lock; }
trap restore_lock EXIT

before="$CARGO_TARGET_DIR/release"
after="$CARGO_TARGET_DIR/fe2o3-payload/release"
cargo build --release -p hubsend-testhub
cargo build --release --features websockets,https --example bench
CARGO_TARGET_DIR="$CARGO_TARGET_DIR/fe2o3-payload" RUSTFLAGS="--cfg hubsend_fe2o3_payload" \
    cargo build --release --features websockets,https --example bench \
    --config "patch.crates-io.fe2o3-amqp.path=\"$patched\""
restore_lock
[[ -n "${BUILD_ONLY:-}" ]] && exit 0

export HUBSEND_TESTHUB_BIN="$before/hubsend-testhub"
ceiling=""
for bin in "$CARGO_TARGET_DIR/release/ceiling" bench-peers/target/release/ceiling; do
    [[ -x "$bin" ]] && ceiling="$bin"
done

mkdir -p bench/results
out="bench/results/fe2o3-payload-$(date -u +%Y%m%dT%H%M%SZ).txt"
{
    echo "# fe2o3 payload patch, before/after  commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (dirty)')"
    echo "# $(nproc) cores, $(uname -sr), $(rustc --version), load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "# bench arguments: --both --mode $MODES --events $EVENTS --single-events $SINGLE_EVENTS ${EXTRA:-}"
    for round in $(seq 1 "$ROUNDS"); do
        for build in before after; do
            bin="$before/examples/bench"
            [[ "$build" == after ]] && bin="$after/examples/bench"
            echo
            echo "## round $round: $build"
            peers=(--no-peers)
            if [[ -n "$ceiling" && "$round" == 1 && "$build" == before ]]; then
                peers=()
                export HUBSEND_BENCH_CEILING_BIN="$ceiling"
            fi
            "$bin" --both --mode "$MODES" --payload-bytes 100 --events "$EVENTS" \
                --single-events "$SINGLE_EVENTS" --json "${peers[@]}" "${EXTRA_ARGS[@]}"
            if [[ -n "${RTT:-}" ]]; then
                echo
                echo "## round $round: $build, TLS through the delay proxy"
                "$bin" --tls --no-peers --rtt-ms 0,20 --mode batch --payload-bytes 100 \
                    --events "$EVENTS" --json "${EXTRA_ARGS[@]}"
            fi
        done
    done
} 2>&1 | tee "$out"
echo "saved to $out"
