#!/usr/bin/env bash
# Runs every test of vfabric: the cores' unit tests, the loopback migration and host
# daemon tests, and, as root, the namespace tests (real TAPs, real pings, tcpdump).
# As root it first installs the system packages the tests use. Extra arguments go to
# `cargo test` (e.g. a test name).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) first"
if [ "$(id -u)" -eq 0 ]; then
    ensure_packages ip:iproute2 ping:iputils-ping tcpdump:tcpdump nft:nftables chattr:e2fsprogs \
        qemu-system-x86_64:qemu-system-x86 iperf3:iperf3
else
    log "not root: the namespace tests will be SKIPPED (run as root to include them)"
fi
cd "$VF_REPO"
log_file=$(mktemp)
trap 'rm -f "$log_file"' EXIT
status=0
cargo test --all-targets "$@" 2>&1 | tee "$log_file" || status=$?
# One closing line over every test binary (cargo prints one per binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$log_file"
exit "$status"
