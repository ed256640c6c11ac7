#!/usr/bin/env bash
# The data path under a MAC flood. Builds the fabric (netns-scripts/up.sh) with vm1 on
# silo104, then pings client -> vm1 BENCH_PINGS times (default 1000) at -i 0.01, first
# idle, then while the client namespace floods the switch with random-source (and
# random-destination) MAC frames at BENCH_FLOOD_RATE frames/s (default 20000; the
# flooder is `vfabric mac-flood`, bounded in count and time). Prints loss and median
# RTT of both runs and their ratio, the frames the flooder sent and the switch took,
# the FDB size, and how much the switch log grew during the flood.
# Target: no loss and a median RTT under 1 ms under the flood.
# Cleans up after itself, also on failure or Ctrl-C. Needs root.
# Usage: bench/flood.sh   (env: BENCH_PINGS, BENCH_FLOOD_RATE, BENCH_PREFIX)
set -euo pipefail
case "${1:-}" in -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
PINGS=${BENCH_PINGS:-1000}
RATE=${BENCH_FLOOD_RATE:-20000}
P=${BENCH_PREFIX:-vf$$}
P=${P:0:8}
WORK=$(mktemp -d /tmp/vfabric-flood.XXXXXX)
export VF_PREFIX=$P VFABRIC_RUN_DIR=$WORK/run
VM_IP=10.10.0.100

log() { printf 'flood: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
[[ "$P" =~ ^[a-z0-9]+$ ]] || die "BENCH_PREFIX must be lower-case letters and digits"
[[ "$PINGS" =~ ^[0-9]+$ && "$RATE" =~ ^[0-9]+$ ]] || die "BENCH_PINGS and BENCH_FLOOD_RATE are numbers"
# A binary of this tree, rebuilt if the sources changed: an older one may lack what
# up.sh calls.
if [ -z "${VFABRIC_BIN:-}" ]; then
    (cd "$REPO" && cargo build --release --quiet) || die "cargo build failed"
    VFABRIC_BIN=$REPO/target/release/vfabric
fi
export VFABRIC_BIN

cleanup() {
    set +e
    [ -n "${FLOOD_PID:-}" ] && kill "$FLOOD_PID" 2>/dev/null
    "$REPO/netns-scripts/down.sh" >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$REPO/netns-scripts/up.sh" >/dev/null 2>&1 || die "up.sh failed"
"$VFABRIC_BIN" vm create vm1 --host silo104 --memory-mb 64 --ip "$VM_IP" >/dev/null
ip netns exec "$P-client" ping -c 3 -i 0.2 -q "$VM_IP" >/dev/null || die "vm1 does not answer"

# run_ping NAME: BENCH_PINGS pings; prints "LOSS_PCT MEDIAN_MS RECEIVED"
run_ping() {
    ip netns exec "$P-client" ping -c "$PINGS" -i 0.01 -W 1 "$VM_IP" >"$WORK/$1.txt" 2>&1 || true
    local rtts n
    rtts=$(grep -o 'time=[0-9.]*' "$WORK/$1.txt" | cut -d= -f2 | sort -n)
    n=$(printf '%s\n' "$rtts" | grep -c . || true)
    awk -v n="$n" -v sent="$PINGS" -v r="$rtts" 'BEGIN {
        split(r, a, "\n"); m = (n > 0) ? (n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2) : -1
        printf "%.1f %.3f %d\n", 100 * (sent - n) / sent, m, n }'
}

port_rx() {
    "$VFABRIC_BIN" ports --json | awk -v want="$1" '
        /"port":/ { gsub(/[",]/, "", $2); p = $2 }
        /"rx_frames":/ { gsub(/,/, "", $2); if (p == want) print $2 }'
}
fdb_size() { "$VFABRIC_BIN" fdb show --json | grep -c '"mac"' || true; }

log "idle: $PINGS pings at -i 0.01"
read -r idle_loss idle_med idle_n <<<"$(run_ping idle)"

secs=$(( PINGS * 20 / 1000 + 5 ))
count=$(( RATE * secs ))
rx0=$(port_rx client)
log0=$(stat -c %s "$VFABRIC_RUN_DIR/switch.log")
log "flood: $RATE frames/s of random MACs from the client (at most $count frames, $secs s)"
ip netns exec "$P-client" "$VFABRIC_BIN" mac-flood --ifname eth0 --rate "$RATE" \
    --count "$count" --seconds "$secs" >"$WORK/flood.json" &
FLOOD_PID=$!
sleep 1
read -r flood_loss flood_med flood_n <<<"$(run_ping flood)"
fdb=$(fdb_size)
kill -INT "$FLOOD_PID" 2>/dev/null || true
wait "$FLOOD_PID" 2>/dev/null || true
FLOOD_PID=
rx1=$(port_rx client)
log1=$(stat -c %s "$VFABRIC_RUN_DIR/switch.log")

printf '\n%-8s %8s %8s %12s\n' RUN PINGS LOSS_% MEDIAN_MS
printf '%-8s %8s %8s %12s\n' idle "$idle_n/$PINGS" "$idle_loss" "$idle_med"
printf '%-8s %8s %8s %12s\n' flood "$flood_n/$PINGS" "$flood_loss" "$flood_med"
awk -v a="$idle_med" -v b="$flood_med" 'BEGIN { if (a > 0) printf "median RTT flood/idle: %.2fx\n", b / a }'
printf 'flooder: %s\n' "$(cat "$WORK/flood.json" 2>/dev/null || echo '(killed before its summary)')"
printf 'switch took %s frames on the client port during the flood; FDB %s entries; switch log +%s bytes\n' \
    "$((rx1 - rx0))" "$fdb" "$((log1 - log0))"
awk -v l="$flood_loss" -v m="$flood_med" 'BEGIN {
    ok = (l + 0 == 0 && m >= 0 && m < 1.0)
    printf "target (no loss, median < 1 ms under the flood): %s\n", ok ? "met" : "NOT met" }'
