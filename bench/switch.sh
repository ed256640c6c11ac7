#!/usr/bin/env bash
# Compares the vfabric switch with the Linux bridge and vde_switch on the same shape:
# three namespaces (client, silo104, silo105), each with one interface on the switch.
# vfabric runs twice: `vfabric` is the switch alone (up.sh --no-hosts), `vfabric-hosts`
# the user's real fabric, host daemons up with vm1 on silo104 (their uplink sockets sit
# on the very vmnic0 the stream ends at); the summary gives hosts-up / hosts-down.
# All three fabrics are built first; then, for BENCH_ROUNDS rounds (default 3), each
# switch in turn (the order rotates every round) gets one iperf3 TCP stream
# client -> silo104 for BENCH_SECS (default 10) and BENCH_PINGS (default 200) pings at
# -i 0.01, of which the median RTT is kept. Interleaving the switches round by round
# exposes them to the same background load; the summary gives per-switch medians and
# the median of the per-round ratios to the bridge.
# Two more rows cross a VXLAN tunnel (VNI 42, UDP 4789) over a veth "underlay" between
# two namespaces standing for two machines: kernel-vxlan is two kernel bridges joined by
# kernel vxlan devices (the baseline), vfabric-vxlan two vfabric switches joined by
# VXLAN ports; client and hosts have MTU 1450 on both (1500 minus VXLAN's 50), and the
# summary adds vfabric-vxlan's ratio to kernel-vxlan.
# `vfabric-attach` is the switch alone again, but silo104's port is an attach port:
# silo104's vmnic0 is one end of a veth pair whose other end (in a namespace of the
# switch's) vfabric uses through a packet socket (`--port silo104=attach:NS:IFNAME`),
# as it would a libvirt guest's TAP; client and silo105 stay TAP ports.
# Cleans up after itself, also on failure or Ctrl-C. Needs root.
# Usage: bench/switch.sh   (env: BENCH_SECS, BENCH_PINGS, BENCH_ROUNDS, BENCH_PREFIX,
#        BENCH_SWITCHES: a subset, kernel-bridge first, e.g. "kernel-bridge vfabric vfabric-hosts";
#        BENCH_ATTACH_ARGS: extra `vfabric switch` arguments for vfabric-attach)
set -euo pipefail
case "${1:-}" in -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
SECS=${BENCH_SECS:-10}
PINGS=${BENCH_PINGS:-200}
ROUNDS=${BENCH_ROUNDS:-3}
P=${BENCH_PREFIX:-vb$$}     # namespace prefix, unique per run
P=${P:0:8}
BUILD_BIN=${VFABRIC_BIN:+no}
VFABRIC_BIN=${VFABRIC_BIN:-$REPO/target/release/vfabric}
WORK=$(mktemp -d /tmp/vfabric-bench.XXXXXX)
read -ra SWITCHES <<<"${BENCH_SWITCHES:-kernel-bridge vfabric vfabric-attach vfabric-hosts vde_switch kernel-vxlan vfabric-vxlan}"
declare -A TAG=([kernel-bridge]=b [vfabric]=v [vfabric-attach]=a [vfabric-hosts]=h [vde_switch]=d [kernel-vxlan]=kx [vfabric-vxlan]=t)
for sw in "${SWITCHES[@]}"; do [ -n "${TAG[$sw]:-}" ] || { echo "unknown switch $sw" >&2; exit 1; }; done
[ "${SWITCHES[0]}" = kernel-bridge ] || { echo "BENCH_SWITCHES must start with kernel-bridge" >&2; exit 1; }
has() { [[ " ${SWITCHES[*]} " == *" $1 "* ]]; }

log() { printf 'bench: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
[[ "$P" =~ ^[a-z0-9]+$ ]] || die "BENCH_PREFIX must be lower-case letters and digits"
if ip netns list | awk '{print $1}' | grep -q "^$P-"; then
    die "namespaces with prefix $P- exist already (another run?); set BENCH_PREFIX"
fi
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
    VF_PREFIX="$P-v" VFABRIC_RUN_DIR="$WORK/vfabric" "$REPO/netns-scripts/down.sh" >/dev/null 2>&1
    VF_PREFIX="$P-h" VFABRIC_RUN_DIR="$WORK/vfabric-h" "$REPO/netns-scripts/down.sh" >/dev/null 2>&1
    if [ -f "$WORK/vde.pid" ]; then kill "$(cat "$WORK/vde.pid")" 2>/dev/null; fi
    for f in "$WORK"/sw[ab].pid "$WORK"/att.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; done
    # Whatever still runs in our namespaces (iperf3 servers, tcpdump), then the
    # namespaces themselves (veths and TAPs go with them).
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^$P-" || true); do
        for f in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$f" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

make_ns() {
    local h
    for h in client silo104 silo105; do
        ip netns add "$P-$1-$h"
        ip -n "$P-$1-$h" link set lo up
    done
}

# hosts_up TAG: addresses and links in namespaces $P-TAG-{client,silo104,silo105}
hosts_up() {
    local t=$1
    ip -n "$P-$t-client" addr add 10.10.0.1/24 dev eth0
    ip -n "$P-$t-silo104" addr add 10.10.0.104/24 dev vmnic0
    ip -n "$P-$t-silo105" addr add 10.10.0.105/24 dev vmnic0
    ip -n "$P-$t-client" link set eth0 up
    ip -n "$P-$t-silo104" link set vmnic0 up
    ip -n "$P-$t-silo105" link set vmnic0 up
}

setup_bridge() {
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
}

setup_vfabric() {
    # A binary of this tree, rebuilt if the sources changed (cargo does nothing if
    # not), unless VFABRIC_BIN named one.
    if [ "${BUILD_BIN:-}" != no ]; then
        log "building the release binary"
        (cd "$REPO" && cargo build --release --quiet)
    fi
    VF_HOSTS=0 VF_PREFIX="$P-v" VFABRIC_RUN_DIR="$WORK/vfabric" VFABRIC_BIN="$VFABRIC_BIN" \
        "$REPO/netns-scripts/up.sh" 2>/dev/null
}

# The same switch with the host daemons up and vm1 on silo104, as a user runs it.
setup_vfabric_hosts() {
    VF_PREFIX="$P-h" VFABRIC_RUN_DIR="$WORK/vfabric-h" VFABRIC_BIN="$VFABRIC_BIN" \
        "$REPO/netns-scripts/up.sh" 2>/dev/null
    VFABRIC_RUN_DIR="$WORK/vfabric-h" "$VFABRIC_BIN" vm create vm1 --host silo104 \
        --memory-mb 64 --ip 10.10.0.100 >/dev/null
}

setup_vde() {
    make_ns d
    local tap="${P}d" i=0 h ifn
    vde_switch -d -s "$WORK/vde.ctl" -M "$WORK/vde.mgmt" -p "$WORK/vde.pid" \
        -t "${tap}0" -t "${tap}1" -t "${tap}2"
    for h in client silo104 silo105; do
        ifn=vmnic0; [ $h = client ] && ifn=eth0
        for _ in $(seq 50); do ip link show "$tap$i" >/dev/null 2>&1 && break; sleep 0.1; done
        ip link set "$tap$i" netns "$P-d-$h" name "$ifn"
        i=$((i + 1))
    done
    hosts_up d
}

# underlay TAG A B: namespaces $P-TAG-A and $P-TAG-B joined by a veth (ul0 10.99.0.1,
# ul1 10.99.0.2): the network between two machines.
underlay() {
    local a="$P-$1-$2" b="$P-$1-$3"
    ip netns add "$a"; ip netns add "$b"
    ip -n "$a" link set lo up; ip -n "$b" link set lo up
    ip link add ul0 netns "$a" type veth peer name ul1 netns "$b"
    ip -n "$a" addr add 10.99.0.1/24 dev ul0; ip -n "$a" link set ul0 up
    ip -n "$b" addr add 10.99.0.2/24 dev ul1; ip -n "$b" link set ul1 up
}

# tunnel_mtu TAG: the hosts' interfaces get the MTU a 1500-byte underlay leaves.
tunnel_mtu() {
    ip -n "$P-$1-client" link set eth0 mtu 1450
    ip -n "$P-$1-silo104" link set vmnic0 mtu 1450
    ip -n "$P-$1-silo105" link set vmnic0 mtu 1450
}

# Two kernel bridges, one per "machine", each with a kernel vxlan device on the underlay.
setup_kernel_vxlan() {
    make_ns kx
    underlay kx swa swb
    local side ns local remote dev h ifn
    for side in a b; do
        ns="$P-kx-sw$side"
        if [ $side = a ]; then local=10.99.0.1 remote=10.99.0.2 dev=ul0
        else local=10.99.0.2 remote=10.99.0.1 dev=ul1; fi
        ip -n "$ns" link add vx0 type vxlan id 42 dstport 4789 local $local remote $remote dev $dev
        ip -n "$ns" link add br0 type bridge
        ip -n "$ns" link set vx0 master br0
        ip -n "$ns" link set vx0 up
        ip -n "$ns" link set br0 up
    done
    for h in client silo104 silo105; do
        ifn=vmnic0 ns="$P-kx-swb"; [ $h = client ] && ifn=eth0 ns="$P-kx-swa"
        ip link add "$ifn" netns "$P-kx-$h" type veth peer name "p-$h" netns "$ns"
        ip -n "$ns" link set "p-$h" master br0
        ip -n "$ns" link set "p-$h" up
    done
    tunnel_mtu kx
    hosts_up kx
}

# Two vfabric switches, one per "machine", joined by VXLAN ports on the underlay.
setup_vfabric_vxlan() {
    make_ns t
    underlay t ula ulb
    local run="$WORK/vfx"
    mkdir -p -m 0700 "$run"
    VFABRIC_RUN_DIR="$run" setsid "$VFABRIC_BIN" switch --name swa \
        --port "client=$P-t-client:eth0" \
        --port "wan=vxlan:vni=42,local=$P-t-ula:10.99.0.1,remote=10.99.0.2" \
        >"$run/swa.log" 2>&1 &
    echo $! >"$WORK/swa.pid"
    VFABRIC_RUN_DIR="$run" setsid "$VFABRIC_BIN" switch --name swb \
        --port "silo104=$P-t-silo104:vmnic0" --port "silo105=$P-t-silo105:vmnic0" \
        --port "wan=vxlan:vni=42,local=$P-t-ulb:10.99.0.2,remote=10.99.0.1" \
        >"$run/swb.log" 2>&1 &
    echo $! >"$WORK/swb.pid"
    for _ in $(seq 100); do
        [ -S "$run/swa.sock" ] && [ -S "$run/swb.sock" ] && break
        sleep 0.1
    done
    [ -S "$run/swa.sock" ] && [ -S "$run/swb.sock" ] || die "vfabric-vxlan: switches did not start: $(cat "$run"/sw*.log)"
    tunnel_mtu t
    hosts_up t
}

# The switch alone, silo104 on an attach port (a veth end), the others on TAPs.
setup_vfabric_attach() {
    setup_vfabric_build
    make_ns a
    ip netns add "$P-a-sw"
    ip -n "$P-a-sw" link set lo up
    ip link add vmnic0 netns "$P-a-silo104" type veth peer name p-silo104 netns "$P-a-sw"
    ip netns exec "$P-a-sw" sysctl -qw net.ipv6.conf.p-silo104.disable_ipv6=1
    ip -n "$P-a-sw" link set p-silo104 up
    local run="$WORK/vfa"
    mkdir -p -m 0700 "$run"
    VFABRIC_RUN_DIR="$run" setsid "$VFABRIC_BIN" switch --name swatt ${BENCH_ATTACH_ARGS:-} \
        --port "client=$P-a-client:eth0" \
        --port "silo104=attach:$P-a-sw:p-silo104" \
        --port "silo105=$P-a-silo105:vmnic0" \
        >"$run/swatt.log" 2>&1 &
    echo $! >"$WORK/att.pid"
    for _ in $(seq 100); do [ -S "$run/swatt.sock" ] && break; sleep 0.1; done
    [ -S "$run/swatt.sock" ] || die "vfabric-attach: switch did not start: $(cat "$run/swatt.log")"
    hosts_up a
}

setup_vfabric_build() {
    if [ "${BUILD_BIN:-}" != no ]; then
        log "building the release binary"
        (cd "$REPO" && cargo build --release --quiet)
    fi
}

# ready TAG: waits for client -> silo104 connectivity, starts the iperf3 server.
ready() {
    local c="$P-$1-client" s="$P-$1-silo104" ok=0
    for _ in $(seq 50); do
        if ip netns exec "$c" ping -c 1 -W 1 -q 10.10.0.104 >/dev/null 2>&1; then ok=1; break; fi
        sleep 0.1
    done
    [ $ok -eq 1 ] || die "$1: no connectivity"
    ip netns exec "$s" iperf3 -s -D >/dev/null
    for _ in $(seq 50); do
        ip netns exec "$s" ss -ltn 2>/dev/null | grep -q ':5201 ' && return 0
        sleep 0.1
    done
    die "$1: iperf3 server did not start"
}

# max_payload TAG: largest TCP payload arriving in silo104 during a 2 s stream (> MTU
# means GSO frames crossed the switch whole).
max_payload() {
    local c="$P-$1-client" s="$P-$1-silo104"
    timeout 3 ip netns exec "$s" tcpdump -i vmnic0 -nn -c 2000 -q "tcp and dst port 5201" \
        >"$WORK/tcpdump-$1.txt" 2>/dev/null &
    local dump=$!
    sleep 0.5
    ip netns exec "$c" iperf3 -c 10.10.0.104 -t 2 >/dev/null 2>&1 || true
    wait $dump 2>/dev/null || true
    awk '{print $NF}' "$WORK/tcpdump-$1.txt" | grep -E '^[0-9]+$' | sort -n | tail -1
}

# measure TAG: prints "GBIT_S RTT_US"
measure() {
    local c="$P-$1-client" gbps rtt
    gbps=$(ip netns exec "$c" iperf3 -c 10.10.0.104 -t "$SECS" -f g \
        | awk '/receiver/ {print $(NF-2)}')
    rtt=$(ip netns exec "$c" ping -c "$PINGS" -i 0.01 10.10.0.104 \
        | sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' | sort -n \
        | awk '{v[NR]=$1} END {if (NR%2) m=v[(NR+1)/2]; else m=(v[NR/2]+v[NR/2+1])/2; printf "%.1f", m*1000}')
    echo "${gbps:-0} ${rtt:-0}"
}

median() { sort -g | awk '{v[NR]=$1} END {if (!NR) {print 0; exit} if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }

setup_bridge
has vfabric && setup_vfabric
has vfabric-attach && setup_vfabric_attach
has vfabric-hosts && { [ -x "$VFABRIC_BIN" ] || setup_vfabric; setup_vfabric_hosts; }
has vde_switch && setup_vde
has kernel-vxlan && setup_kernel_vxlan
has vfabric-vxlan && setup_vfabric_vxlan
declare -A MAXLEN
for sw in "${SWITCHES[@]}"; do
    ready "${TAG[$sw]}"
    MAXLEN[$sw]=$(max_payload "${TAG[$sw]}")
done

: >"$WORK/results"
for r in $(seq "$ROUNDS"); do
    for k in $(seq 0 $((${#SWITCHES[@]} - 1))); do
        sw=${SWITCHES[$(( (k + r - 1) % ${#SWITCHES[@]} ))]}
        read -r g rt < <(measure "${TAG[$sw]}")
        log "round $r $sw: $g Gbit/s, median RTT $rt us"
        echo "$r $sw $g $rt" >>"$WORK/results"
    done
done
if has vfabric; then
    VFABRIC_RUN_DIR="$WORK/vfabric" "$VFABRIC_BIN" ports >&2
    # Frames the client's kernel dropped before the switch read them (TAP queue full).
    log "vfabric client eth0 TX drops: $(ip -n "$P-v-client" -s link show eth0 | awk '/TX:/ {getline; print $4}')"
fi

col() { awk -v s="$1" -v c="$2" '$2 == s {print $c}' "$WORK/results"; }
# per-round ratio of switch $1 to switch $2 in column $3 (op: / or -)
per_round() {
    awk -v a="$1" -v b="$2" -v c="$3" -v op="$4" '
        $2 == a {x[$1] = $c} $2 == b {y[$1] = $c}
        END {for (r in x) if (r in y) print (op == "/" ? (y[r] > 0 ? x[r] / y[r] : 0) : x[r] - y[r])}' \
        "$WORK/results"
}
echo
echo "$ROUNDS rounds, iperf3 -t $SECS (one TCP stream), ping -c $PINGS -i 0.01; medians"
printf '%-14s %11s %9s %14s %11s %14s  %s\n' switch "TCP Gbit/s" "x bridge" "RTT median us" "+us bridge" "max payload B" "per round Gbit/s | RTT us"
for sw in "${SWITCHES[@]}"; do
    g=$(col "$sw" 3 | median); rt=$(col "$sw" 4 | median)
    x=$(per_round "$sw" kernel-bridge 3 / | median); d=$(per_round "$sw" kernel-bridge 4 - | median)
    printf '%-14s %11.2f %9.2f %14.1f %11.1f %14s  %s | %s\n' "$sw" "$g" "$x" "$rt" "$d" "${MAXLEN[$sw]:-?}" \
        "$(col "$sw" 3 | paste -sd' ')" "$(col "$sw" 4 | paste -sd' ')"
done
echo
if has vfabric-vxlan && has kernel-vxlan; then
    tx=$(per_round vfabric-vxlan kernel-vxlan 3 / | median)
    tr=$(per_round vfabric-vxlan kernel-vxlan 4 / | median)
    td=$(per_round vfabric-vxlan kernel-vxlan 4 - | median)
    awk -v x="$tx" -v r="$tr" -v d="$td" 'BEGIN {
        printf "across a VXLAN tunnel, vfabric-vxlan vs kernel-vxlan: throughput %.2f x, median RTT %.2f x (%+.1f us)\n", x, r, d
    }'
fi
if has vfabric; then
    x=$(per_round vfabric kernel-bridge 3 / | median)
    d=$(per_round vfabric kernel-bridge 4 - | median)
    awk -v x="$x" -v d="$d" 'BEGIN {
        printf "target vfabric >= 0.75 x bridge throughput: %.2f x  %s\n", x, (x >= 0.75 ? "met" : "NOT met")
        printf "target added median RTT <= 30 us over bridge: %+.1f us  %s\n", d, (d <= 30 ? "met" : "NOT met")
    }'
fi
if has vfabric && has vfabric-attach; then
    ax=$(per_round vfabric-attach vfabric 3 / | median)
    ad=$(per_round vfabric-attach vfabric 4 - | median)
    awk -v x="$ax" -v d="$ad" 'BEGIN {
        printf "silo104 on an attach port (veth) vs a TAP port: throughput %.2f x, median RTT %+.1f us\n", x, d }'
fi
if has vfabric && has vde_switch; then
    v=$(per_round vfabric vde_switch 3 / | median)
    awk -v v="$v" 'BEGIN { printf "target vfabric >= 3 x vde_switch throughput: %.2f x  %s\n", v, (v >= 3 ? "met" : "NOT met") }'
fi
if has vfabric && has vfabric-hosts; then
    xh=$(per_round vfabric-hosts kernel-bridge 3 / | median)
    hv=$(per_round vfabric-hosts vfabric 3 / | median)
    awk -v xh="$xh" -v hv="$hv" 'BEGIN {
        printf "hosts up: %.2f x bridge; %.2f x the switch alone (target: no measurable difference)\n", xh, hv }'
fi
