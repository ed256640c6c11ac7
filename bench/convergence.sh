#!/usr/bin/env bash
# Convergence benchmark: workloads (idle; uniform at 1k, 10k and 50k pages/s; a hot
# set rewritten faster than the link; the field report's 4 GiB case scaled down) x
# pre-copy policies (today's; plateau; plateau + auto-converge), over a capped
# loopback link, source and target in one process. Prints rounds, total time,
# downtime, data sent and the throttle, then the targets as figures:
#   - downtime <= 1.5 x the downtime target, or aborted by the stun guard with the VM
#     running on the source at full speed;
#   - total <= 3 x memory / link time.
#
#   bench/convergence.sh [--memory-mb 128] [--link-mbps 1000] [--downtime-ms 30]
#                        [--max-downtime-ms 1000] [--only NAME]
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; echo ;; esac
cargo build --release --example convergence_bench
export RUST_LOG=${RUST_LOG:-warn}
exec target/release/examples/convergence_bench "$@"
