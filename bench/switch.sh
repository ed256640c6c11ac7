#!/usr/bin/env bash
# Compares the vfabric switch with the Linux bridge and vde_switch on the same shape:
# three namespaces (client, silo104, silo105), each with one interface on the switch.
# For each switch: iperf3, one TCP stream client -> silo104 for BENCH_SECS (default 10),
# and the median of BENCH_PINGS (default 200) ping RTTs at -i 0.01.
# Prints a table with ratios to the kernel bridge. Cleans up after itself, also on
# failure or Ctrl-C. Needs root. Usage: bench/switch.sh
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
SECS=${BENCH_SECS:-10}
PINGS=${BENCH_PINGS:-200}
P=${BENCH_PREFIX:-vb$$}     # namespace prefix, unique per run
P=${P:0:8}
WORK=$(mktemp -d /tmp/vfabric-bench.XXXXXX)
RESULTS=()

log() { printf 'bench: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
missing=()
for pair in ip:iproute2 ping:iputils-ping iperf3:iperf3 vde_switch:vde2 tcpdump:tcpdump; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ -f /etc/debian_version ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        die "install: ${missing[*]}"
    fi
fi

cleanup() {
    set +e
    local ns f
    # vfabric topology
    VF_PREFIX="$P-v" VFABRIC_RUN_DIR="$WORK/vfabric" "$REPO/netns-scripts/down.sh" >/dev/null 2>&1
    # vde_switch
    if [ -f "$WORK/vde.pid" ]; then kill "$(cat "$WORK/vde.pid")" 2>/dev/null; fi
    # anything left in our namespaces (iperf3 servers), then the namespaces themselves
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^$P-" || true); do
        for f in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$f" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# hosts_up TAG IF_CLIENT IF_HOST: addresses and links in namespaces $P-TAG-{client,...}
hosts_up() {
    local t=$1
    ip -n "$P-$t-client" addr add 10.10.0.1/24 dev eth0
    ip -n "$P-$t-silo104" addr add 10.10.0.104/24 dev vmnic0
    ip -n "$P-$t-silo105" addr add 10.10.0.105/24 dev vmnic0
    ip -n "$P-$t-client" link set eth0 up
    ip -n "$P-$t-silo104" link set vmnic0 up
    ip -n "$P-$t-silo105" link set vmnic0 up
}

make_ns() {
    local h
    for h in client silo104 silo105; do
        ip netns add "$P-$1-$h"
        ip -n "$P-$1-$h" link set lo up
    done
}

# measure NAME TAG: runs iperf3 and ping through namespaces $P-TAG-*
measure() {
    local name=$1 t=$2 gbps rtt maxlen
    local c="$P-$t-client" s="$P-$t-silo104"
    ping_ok=0
    for _ in $(seq 50); do
        if ip netns exec "$c" ping -c 1 -W 1 -q 10.10.0.104 >/dev/null 2>&1; then ping_ok=1; break; fi
        sleep 0.1
    done
    [ $ping_ok -eq 1 ] || die "$name: no connectivity"
    ip netns exec "$s" iperf3 -s -D -1 -I "$WORK/iperf-$t.pid" >/dev/null
    sleep 0.3
    # Largest frame seen arriving in silo104 in the first seconds: > MTU means GSO
    # frames crossed the switch whole.
    timeout 2 ip netns exec "$s" tcpdump -i vmnic0 -nn -c 2000 -q "tcp and dst port 5201" \
        >"$WORK/tcpdump-$t.txt" 2>/dev/null &
    local dump=$!
    gbps=$(ip netns exec "$c" iperf3 -c 10.10.0.104 -t "$SECS" -f g \
        | awk '/receiver/ {print $(NF-2)}')
    wait $dump 2>/dev/null || true
    maxlen=$(awk '{print $NF}' "$WORK/tcpdump-$t.txt" | sort -n | tail -1)
    rtt=$(ip netns exec "$c" ping -c "$PINGS" -i 0.01 10.10.0.104 \
        | sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' | sort -n \
        | awk '{v[NR]=$1} END {if (NR%2) m=v[(NR+1)/2]; else m=(v[NR/2]+v[NR/2+1])/2; printf "%.1f", m*1000}')
    log "$name: ${gbps} Gbit/s, median RTT ${rtt} us, largest TCP payload seen ${maxlen:-?} B"
    RESULTS+=("$name $gbps $rtt ${maxlen:-0}")
}

bench_bridge() {
    make_ns b
    ip netns add "$P-b-sw"
    ip -n "$P-b-sw" link add br0 type bridge
    ip -n "$P-b-sw" link set br0 up
    local h ifn
    for h in client silo104 silo105; do
        ifn=vmnic0; [ $h = client ] && ifn=eth0
        ip link add "$ifn" netns "$P-b-$h" type veth peer name "p-$h" netns "$P-b-sw"
        ip -n "$P-b-sw" link set "p-$h" master br0
        ip -n "$P-b-sw" link set "p-$h" up
    done
    hosts_up b
    measure "kernel-bridge" b
}

bench_vfabric() {
    log "building the release binary"
    (cd "$REPO" && cargo build --release --quiet)
    VF_PREFIX="$P-v" VFABRIC_RUN_DIR="$WORK/vfabric" VFABRIC_BIN="$REPO/target/release/vfabric" \
        "$REPO/netns-scripts/up.sh"
    measure "vfabric" v
    VFABRIC_RUN_DIR="$WORK/vfabric" "$REPO/target/release/vfabric" ports >&2
}

bench_vde() {
    make_ns d
    local tap="${P}d"
    vde_switch -d -s "$WORK/vde.ctl" -M "$WORK/vde.mgmt" -p "$WORK/vde.pid" \
        -t "${tap}0" -t "${tap}1" -t "${tap}2"
    local i=0 h ifn
    for h in client silo104 silo105; do
        ifn=vmnic0; [ $h = client ] && ifn=eth0
        for _ in $(seq 50); do ip link show "$tap$i" >/dev/null 2>&1 && break; sleep 0.1; done
        ip link set "$tap$i" netns "$P-d-$h" name "$ifn"
        i=$((i + 1))
    done
    hosts_up d
    measure "vde_switch" d
}

bench_bridge
bench_vfabric
bench_vde

printf '\n%-14s %12s %9s %14s %12s %14s\n' "switch" "TCP Gbit/s" "x bridge" "RTT median us" "+us bridge" "max payload B"
base_g=$(echo "${RESULTS[0]}" | awk '{print $2}')
base_r=$(echo "${RESULTS[0]}" | awk '{print $3}')
for r in "${RESULTS[@]}"; do
    echo "$r" | awk -v bg="$base_g" -v br="$base_r" \
        '{printf "%-14s %12.2f %9.2f %14.1f %12.1f %14s\n", $1, $2, (bg>0?$2/bg:0), $3, $3-br, $4}'
done
vf_g=$(echo "${RESULTS[1]}" | awk '{print $2}')
vf_r=$(echo "${RESULTS[1]}" | awk '{print $3}')
vde_g=$(echo "${RESULTS[2]}" | awk '{print $2}')
echo
awk -v v="$vf_g" -v b="$base_g" -v d="$vde_g" -v vr="$vf_r" -v br="$base_r" 'BEGIN {
    printf "target vfabric >= 0.75 x bridge throughput: %.2f x  %s\n", v/b, (v/b >= 0.75 ? "met" : "NOT met")
    printf "target vfabric >= 3 x vde_switch throughput: %.2f x  %s\n", (d>0?v/d:0), (d>0 && v/d >= 3 ? "met" : "NOT met")
    printf "target added median RTT <= 30 us over bridge: %+.1f us  %s\n", vr-br, (vr-br <= 30 ? "met" : "NOT met")
}'
