#!/usr/bin/env python3
"""Checks that the workspace's `rust-version` is true without a second toolchain (none can be
installed here): every dependency a user builds (normal edges, every feature of each published
crate) declares a rust-version no newer than ours. Our own code is held to it by clippy's
`incompatible_msrv` lint, which `cargo clippy -D warnings` runs against the same rust-version."""
import json
import subprocess
import sys


def version(v):
    return tuple(int(x) for x in (v.split(".") + ["0", "0"])[:3])


meta = json.loads(subprocess.check_output(
    ["cargo", "metadata", "--format-version", "1", "--locked"]))
ours = {p["name"]: p for p in meta["packages"] if p["id"] in meta["workspace_members"]}
msrv = {p["rust_version"] for p in ours.values()}
if len(msrv) != 1 or None in msrv:
    sys.exit(f"msrv: every workspace crate must declare the same rust-version, got {msrv}")
msrv = msrv.pop()
by_name_version = {(p["name"], p["version"]): p for p in meta["packages"]}

failures = []
checked = set()
for crate in ["hubsend", "hubsend-spool", "hubsend-cli", "hubsend-testhub"]:
    for features in (["--all-features"], ["--no-default-features", "--features", "ring"]):
        if crate != "hubsend" and "ring" in features:
            continue
        tree = subprocess.check_output(
            ["cargo", "tree", "-p", crate, "-e", "normal", "--prefix", "none",
             "--format", "{p}", "--locked", *features], text=True)
        for line in tree.splitlines():
            parts = line.split()
            if len(parts) < 2 or not parts[1].startswith("v"):
                continue
            key = (parts[0], parts[1][1:])
            if key in checked:
                continue
            checked.add(key)
            package = by_name_version.get(key)
            needed = package and package.get("rust_version")
            if needed and version(needed) > version(msrv):
                failures.append(f"{key[0]} {key[1]} needs Rust {needed} ({crate} {' '.join(features)})")

if failures:
    print(f"msrv: rust-version {msrv} is too old for:", *failures, sep="\n  ")
    sys.exit(1)
newest = max((by_name_version[k].get("rust_version") or "0" for k in checked if k in by_name_version), key=version)
print(f"msrv: rust-version {msrv} holds for {len(checked)} dependencies (the newest needs {newest})")
