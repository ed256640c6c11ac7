#!/usr/bin/env bash
# Runs every test of vfabric: the cores' unit tests, the loopback migration and host
# daemon tests, and, as root, the namespace tests (real TAPs, real pings, tcpdump).
# As root it first installs the system packages the tests use. Extra arguments go to
# `cargo test` (e.g. a test name).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) first"
if [ "$(id -u)" -eq 0 ]; then
    ensure_packages ip:iproute2 ping:iputils-ping tcpdump:tcpdump
else
    log "not root: the namespace tests will be SKIPPED (run as root to include them)"
fi
cd "$VF_REPO"
cargo test --all-targets "$@"
