#!/usr/bin/env bash
# The published `hubsend` crate's own tests and examples compile as a crates.io user would get
# them: from the packaged .crate files (run `cargo package --workspace` first), with the
# hubsend-testhub dev-dependency resolved to its packaged crate, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(realpath "${CARGO_TARGET_DIR:-target}")
package="$target/package"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar xzf "$package/hubsend-0.1.0.crate" -C "$work"
tar xzf "$package/hubsend-testhub-0.1.0.crate" -C "$work"
cd "$work/hubsend-0.1.0"
# The test hub is not on crates.io yet: point its name at the packaged copy.
cat >>Cargo.toml <<TOML

[patch.crates-io]
hubsend-testhub = { path = "../hubsend-testhub-0.1.0" }
TOML
# The same target directory: the registry dependencies built for the workspace are reused.
CARGO_TARGET_DIR="$target" cargo test --offline --all-targets --no-run
echo "the published hubsend crate's tests and examples compile"
