#!/usr/bin/env bash
# The maintenance-mode demo: vMotion's other job in the book. Brings up four hosts and
# eight VMs (topologies/four-hosts.toml), pings the two VMs on silo104 from the client
# every 10 ms, puts silo104 in maintenance mode (it stops admitting VMs, then its VMs
# move to the other hosts, two at a time, each placed where admission has room), shows
# the users lost next to nothing, that silo104 now refuses VMs, and finally lets it
# admit again and rebalances the fabric. Cleans up unless --keep.
#
# Usage: demo-evacuate.sh [--keep] [--parallel N]   (also: demo.sh --scenario evacuate)
#   --keep        leave the fabric up afterwards to try things by hand
#   --parallel N  migrations at once during the evacuation (default 2)
#
# Environment: VFABRIC_BIN=PATH runs that vfabric binary instead of building one with
# cargo; VF_PREFIX and VFABRIC_RUN_DIR choose the fabric's names and run directory.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

KEEP=0 PARALLEL=2
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --keep) KEEP=1 ;;
        --parallel) PARALLEL=${2:?--parallel needs a value}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "demo-evacuate.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

. "$here/lib.sh"
FILE="$here/topologies/four-hosts.toml"
# silo104's VMs in that file.
EVACUEES=("vm1 10.10.0.201" "vm2 10.10.0.202")

step() { printf '\n== %s\n' "$*"; }

need_root
ensure_packages ip:iproute2 ping:iputils-ping
if [ -n "${VFABRIC_BIN:-}" ]; then
    [ -x "$VFABRIC_BIN" ] || die "VFABRIC_BIN=$VFABRIC_BIN is not an executable"
else
    command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) first, or set VFABRIC_BIN"
    step "building vfabric (cargo build --release; set VFABRIC_BIN to use a built binary)"
    (cd "$VF_REPO" && cargo build --release) || die "cargo build failed"
    VFABRIC_BIN="$VF_REPO/target/release/vfabric"
fi
export VFABRIC_BIN
vf() { "$VFABRIC_BIN" "$@"; }

PING_PIDS=()
cleanup() {
    local rc=$? p
    for p in "${PING_PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    if [ "$KEEP" = 1 ] && [ "$rc" = 0 ]; then
        cat <<EOT

== the fabric is still up (--keep); try, as root:
   export VF_PREFIX=$VF_PREFIX VFABRIC_RUN_DIR=$VFABRIC_RUN_DIR PATH=$(dirname "$VFABRIC_BIN"):\$PATH
   vfabric hosts                                  # modes, loads, VMs
   vfabric host maintenance enter silo106         # empty another host
   vfabric balance --dry-run                      # what the balancer would move
   $here/down.sh                                  # remove it all
EOT
    else
        "$here/down.sh" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

step "bringing up four hosts and eight VMs ($FILE)"
"$here/down.sh" >/dev/null 2>&1 || true
"$here/up.sh" "$FILE"

step "the datacenter: every host, its load and its VMs"
vf hosts

step "pinging silo104's VMs from $VF_PREFIX-client every 10 ms; one UDP request each"
for e in "${EVACUEES[@]}"; do
    set -- $e
    ip netns exec "$VF_PREFIX-client" "$VFABRIC_BIN" udp "$2" incr
    ip netns exec "$VF_PREFIX-client" ping -q -i 0.01 "$2" >"$VFABRIC_RUN_DIR/evacuate-ping-$1.txt" 2>&1 &
    PING_PIDS+=($!)
done
sleep 1

step "vfabric host maintenance enter silo104 --parallel $PARALLEL"
vf host maintenance enter silo104 --parallel "$PARALLEL"

sleep 0.5
for p in "${PING_PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
PING_PIDS=()

step "what the users saw (ping's own summary, 10 ms apart)"
for e in "${EVACUEES[@]}"; do
    set -- $e
    printf '%s: %s\n' "$1" "$(grep 'packets transmitted' "$VFABRIC_RUN_DIR/evacuate-ping-$1.txt" || echo 'no summary')"
    printf '%s: UDP counter now %s\n' "$1" "$(ip netns exec "$VF_PREFIX-client" "$VFABRIC_BIN" udp "$2" get)"
done

step "silo104 is empty and in maintenance mode"
vf hosts

step "a new VM on silo104 is refused while it is in maintenance"
vf vm create vm9 --host silo104 --ip 10.10.0.209 --memory-mb 64 || true

step "maintenance over: silo104 admits again, and the balancer evens the loads out"
vf host maintenance exit silo104
vf balance --threshold 0.05
vf hosts
