#!/usr/bin/env bash
# What a bulk stream on one port does to another port's round trips through vfabric,
# under several data-path settings. The switch alone (up.sh --no-hosts): silo105 sends
# one iperf3 TCP stream to the client while silo104 pings the client every 10 ms; the
# summary gives, per setting, the stream's throughput and the pings' median and 99th
# percentile RTT. With BENCH_HOGS=N, N busy shell loops compete for the CPUs meanwhile
# (what --rt-priority and --cpu are for). Settings run interleaved, BENCH_ROUNDS times.
# Cleans up after itself, also on failure or Ctrl-C. Needs root.
# Usage: bench/fairness.sh ["SWITCH ARGS" ...]
#        (default settings: "--batch 1" "--batch 32" "--batch 256")
#        env: BENCH_SECS (default 8), BENCH_PINGS (default 250), BENCH_ROUNDS (default 3),
#        BENCH_HOGS (default 0), BENCH_PREFIX, VFABRIC_BIN (a binary to use as is)
set -euo pipefail
case "${1:-}" in -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
SECS=${BENCH_SECS:-8}
PINGS=${BENCH_PINGS:-250}
ROUNDS=${BENCH_ROUNDS:-3}
HOGS=${BENCH_HOGS:-0}
P=${BENCH_PREFIX:-vf$$}
P=${P:0:8}
BUILD_BIN=${VFABRIC_BIN:+no}
VFABRIC_BIN=${VFABRIC_BIN:-$REPO/target/release/vfabric}
WORK=$(mktemp -d /tmp/vfabric-fair.XXXXXX)
if [ $# -gt 0 ]; then SETTINGS=("$@"); else SETTINGS=("--batch 1" "--batch 32" "--batch 256"); fi

log() { printf 'bench: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
[ "$(id -u)" -eq 0 ] || die "must run as root"
[[ "$P" =~ ^[a-z0-9]+$ ]] || die "BENCH_PREFIX must be lower-case letters and digits"
. "$REPO/netns-scripts/lib.sh"
ensure_packages ip:iproute2 ping:iputils-ping iperf3:iperf3

HOG_PIDS=()
down() {
    VF_PREFIX=$P VFABRIC_RUN_DIR="$WORK/run" "$REPO/netns-scripts/down.sh" >/dev/null 2>&1 || true
}
cleanup() {
    set +e
    for h in "${HOG_PIDS[@]}"; do kill "$h" 2>/dev/null; done
    down
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$BUILD_BIN" != no ]; then
    log "building the release binary"
    (cd "$REPO" && cargo build --release --quiet)
fi

# run SETTING: prints "GBIT_S RTT_MEDIAN_US RTT_P99_US"
run() {
    mkdir -p -m 0700 "$WORK/run"
    VF_HOSTS=0 VF_PREFIX=$P VFABRIC_RUN_DIR="$WORK/run" VFABRIC_BIN="$VFABRIC_BIN" \
        VF_SWITCH_ARGS="$1" "$REPO/netns-scripts/up.sh" >/dev/null 2>&1 || die "up.sh $1"
    local c="$P-client"
    ip netns exec "$c" iperf3 -s -1 -D >/dev/null
    sleep 0.3
    ip netns exec "$P-silo105" iperf3 -c 10.10.0.1 -t "$SECS" -f g >"$WORK/iperf" 2>&1 &
    local ip=$!
    sleep 1
    ip netns exec "$P-silo104" ping -c "$PINGS" -i 0.01 -n 10.10.0.1 2>/dev/null \
        | sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' | sort -g >"$WORK/rtt" || true
    wait $ip || true
    local g med p99
    g=$(awk '/receiver/ {print $(NF-2)}' "$WORK/iperf")
    med=$(awk '{v[NR]=$1} END {if (!NR) {print 0; exit} printf "%.0f", v[int((NR+1)/2)]*1000}' "$WORK/rtt")
    p99=$(awk '{v[NR]=$1} END {if (!NR) {print 0; exit} i=int(NR*0.99); if (i<1) i=1; printf "%.0f", v[i]*1000}' "$WORK/rtt")
    down
    echo "${g:-0} $med $p99"
}

for _ in $(seq "$HOGS"); do
    sh -c 'while :; do :; done' &
    HOG_PIDS+=($!)
done

: >"$WORK/results"
for r in $(seq "$ROUNDS"); do
    for k in $(seq 0 $((${#SETTINGS[@]} - 1))); do
        i=$(( (k + r - 1) % ${#SETTINGS[@]} ))
        read -r g med p99 < <(run "${SETTINGS[$i]}")
        log "round $r [${SETTINGS[$i]}]: $g Gbit/s, RTT median $med us, p99 $p99 us ($(uptime | sed 's/.*load/load/'))"
        echo "$r $i $g $med $p99" >>"$WORK/results"
    done
done

median() { sort -g | awk '{v[NR]=$1} END {if (!NR) {print 0; exit} if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
echo
echo "$ROUNDS rounds; silo105 -> client iperf3 -t $SECS while silo104 pings the client ($PINGS at -i 0.01); $HOGS busy loops; medians over rounds"
printf '%-40s %11s %15s %12s\n' setting "TCP Gbit/s" "RTT median us" "RTT p99 us"
for i in $(seq 0 $((${#SETTINGS[@]} - 1))); do
    col() { awk -v i="$i" -v c="$1" '$2 == i {print $c}' "$WORK/results" | median; }
    printf '%-40s %11.2f %15.0f %12.0f\n' "${SETTINGS[$i]:-(defaults)}" "$(col 3)" "$(col 4)" "$(col 5)"
done
