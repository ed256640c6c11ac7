#!/usr/bin/env bash
# Migration benchmark: a 1 GiB VM whose every page holds non-zero data moves between
# two endpoints; prints the total time against the physical limit (non-zero bytes ÷
# raw TCP throughput of the same path, measured in the same invocation) and the
# downtime at 0, 1,000 and 10,000 dirty pages/s.
#
#   bench/migration.sh                 # loopback, source and target in one process;
#                                      # raw throughput: in-process tokio copy
#   sudo bench/migration.sh --veth     # veth link between two namespaces created
#                                      # and removed here; raw throughput: iperf3
#   sudo bench/migration.sh --vmotion-path
#                                      # only the raw cost of the N-host vMotion
#                                      # network: iperf3 host to host over the vMotion
#                                      # switch (up.sh, a two-host topology file with
#                                      # network = "switch") against a veth pair, in
#                                      # alternating runs, and their ratio
#
# The headline runs do not verify memory; one more run at 1,000 pages/s does, against
# a verifying target. Last, encrypted vMotion (TLS 1.3, a fabric CA made for the run)
# against plaintext: alternate pairs of migrations at rate 0 over the same path, and the
# ratio of their best throughputs (target >= 0.8), with the CPU both took; then the same
# comparison over the veth shaped to 10 Gbit/s (VF_BENCH_LINK_GBIT; 0 skips), where the
# link and not the two CPUs is the bottleneck. Targets prepare the VM's memory
# before each stream as `vfabric migrate` has them do (--fresh: they do not). Extra
# arguments go to the benchmark binary
# (e.g. --memory-mb 256, --verify, --huge-pages, --pause-ms 5000).
set -euo pipefail
cd "$(dirname "$0")/.."

veth=0
vmotion_path=0
prepared=1
args=()
for a in "$@"; do
    case "$a" in
        --veth) veth=1 ;;
        --vmotion-path) vmotion_path=1 ;;
        --fresh) prepared=0 ;;
        -h|--help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            echo
            echo "Environment: VF_BENCH_LINK_GBIT (10; 0 skips the shaped comparison),"
            echo "VF_BENCH_SECS (3, --vmotion-path). The benchmark binary's own options follow."
            echo
            cargo build --release --quiet --example migrate_bench
            exec target/release/examples/migrate_bench --help
            ;;
        *) args+=("$a") ;;
    esac
done
# As `vfabric migrate` does, each target makes the VM's memory ready before the stream
# (mapped and faulted in; the time it takes is printed, not counted in the total).
# --fresh: the target maps fresh memory and faults it in on a thread beside the stream.
if [ "$prepared" = 1 ]; then
    args+=(--prepared)
fi

# iperf3 -c in namespace $1 to $2 for $3 seconds: Gbit/s received.
iperf_gbps() {
    ip netns exec "$1" iperf3 -c "$2" -p 5201 -t "$3" -J |
        python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
}

# The vMotion network's raw throughput: the vMotion switch as up.sh builds it for N
# hosts, against the veth pair up.sh uses for two.
vmotion_path_bench() {
    . netns-scripts/lib.sh
    need_root
    ensure_packages ip:iproute2 iperf3:iperf3
    ensure_bin
    local best_sw=0 best_veth=0 g i secs=${VF_BENCH_SECS:-3}
    # Global: the exit trap reads them after this function has returned.
    p=vb$(printf '%04x' $((RANDOM)))
    work=$(mktemp -d)
    cat >"$work/two.toml" <<'TOML'
[vmotion]
network = "switch"
[[host]]
name = "a"
ip = "10.10.0.11"
[[host]]
name = "b"
ip = "10.10.0.12"
TOML
    veth_a=$p-va veth_b=$p-vb
    # shellcheck disable=SC2317 # run by the trap
    cleanup_path() {
        ip netns pids "$veth_b" 2>/dev/null | xargs -r kill 2>/dev/null || true
        ip netns pids "$p-b" 2>/dev/null | xargs -r kill 2>/dev/null || true
        ip netns del "$veth_a" 2>/dev/null || true
        ip netns del "$veth_b" 2>/dev/null || true
        VF_PREFIX=$p VFABRIC_RUN_DIR=$work/run netns-scripts/down.sh >/dev/null 2>&1 || true
        rm -rf "$work"
    }
    trap cleanup_path EXIT INT TERM
    VF_HOSTS=0 VF_PREFIX=$p VFABRIC_RUN_DIR=$work/run VFABRIC_BIN=$VFABRIC_BIN \
        netns-scripts/up.sh "$work/two.toml" 2>/dev/null
    ip netns add "$veth_a"
    ip netns add "$veth_b"
    ip link add vmk1 netns "$veth_a" type veth peer name vmk1 netns "$veth_b"
    ip -n "$veth_a" addr add 10.20.0.11/24 dev vmk1
    ip -n "$veth_b" addr add 10.20.0.12/24 dev vmk1
    for ns in "$veth_a" "$veth_b"; do
        ip -n "$ns" link set lo up
        ip -n "$ns" link set vmk1 up
    done
    ip netns exec "$p-b" iperf3 -s -p 5201 -D
    ip netns exec "$veth_b" iperf3 -s -p 5201 -D
    sleep 0.5
    # Alternate, so that load from elsewhere falls on both paths alike; best of 3 each.
    for i in 1 2 3; do
        g=$(iperf_gbps "$p-a" 10.20.0.12 "$secs")
        echo "run $i: vMotion switch $g Gbit/s"
        best_sw=$(python3 -c "print(max($best_sw, $g))")
        g=$(iperf_gbps "$veth_a" 10.20.0.12 "$secs")
        echo "run $i: veth pair      $g Gbit/s"
        best_veth=$(python3 -c "print(max($best_veth, $g))")
    done
    echo "iperf3 host to host, best of 3 x ${secs} s: vMotion switch $best_sw Gbit/s," \
        "veth pair $best_veth Gbit/s, ratio $(python3 -c "print('%.2f' % ($best_sw / $best_veth))")"
}

if [ "$vmotion_path" = 1 ]; then
    vmotion_path_bench
    exit 0
fi

cargo build --release --example migrate_bench
bin=target/release/examples/migrate_bench
export RUST_LOG=${RUST_LOG:-warn}

if [ "$veth" = 0 ]; then
    exec "$bin" "${args[@]}"
fi

if [ "$(id -u)" != 0 ]; then
    echo "bench/migration.sh: --veth needs root (namespaces and a veth pair)" >&2
    exit 1
fi
. netns-scripts/lib.sh
ensure_packages ip:iproute2 iperf3:iperf3

p=vb$(printf '%04x' $((RANDOM)))
nsa=$p-src nsb=$p-dst
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$nsa" 2>/dev/null || true
    ip netns del "$nsb" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

ip netns add "$nsa"
ip netns add "$nsb"
ip link add "$p-a" type veth peer name "$p-b"
ip link set "$p-a" netns "$nsa"
ip link set "$p-b" netns "$nsb"
ip -n "$nsa" addr add 10.99.0.1/24 dev "$p-a"
ip -n "$nsb" addr add 10.99.0.2/24 dev "$p-b"
for ns in "$nsa" "$nsb"; do ip -n "$ns" link set lo up; done
ip -n "$nsa" link set "$p-a" up
ip -n "$nsb" link set "$p-b" up

mem_mb=1024
for ((i = 0; i < ${#args[@]}; i++)); do
    [ "${args[$i]}" = --memory-mb ] && mem_mb=${args[$((i + 1))]}
done

# Raw throughput of the path: iperf3 moving the same byte count, best of 3.
ip netns exec "$nsb" iperf3 -s -p 5201 >/dev/null 2>&1 &
pids+=($!)
sleep 0.5
gbps=0
for _ in 1 2 3; do
    g=$(ip netns exec "$nsa" iperf3 -c 10.99.0.2 -p 5201 -n "${mem_mb}M" -J |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)')
    gbps=$(python3 -c "print(max($gbps, $g))")
done
echo "iperf3 over veth, ${mem_mb} MiB, best of 3: $gbps Gbit/s"

pki=$(mktemp -d)
trap 'cleanup; rm -rf "$pki"' EXIT INT TERM
"$bin" --make-pki "$pki/pki"
ip netns exec "$nsb" "$bin" --tls-listen 10.99.0.2:8002 --pki-dir "$pki/pki" "${args[@]}" &
pids+=($!)
ip netns exec "$nsb" "$bin" --listen 10.99.0.2:8000 "${args[@]}" &
pids+=($!)
# A second target that verifies memory, for the one verified run.
ip netns exec "$nsb" "$bin" --listen 10.99.0.2:8001 --verify "${args[@]}" &
pids+=($!)
ip netns exec "$nsb" "$bin" --raw-listen 10.99.0.2:8003 "${args[@]}" &
pids+=($!)
for _ in $(seq 50); do
    [ "$(ip netns exec "$nsb" ss -ltn | grep -c '10.99.0.2:800[0123] ')" = 4 ] && break
    sleep 0.1
done
ip netns exec "$nsa" "$bin" --connect 10.99.0.2:8000 --verified-connect 10.99.0.2:8001 \
    --tls-connect 10.99.0.2:8002 --raw-connect 10.99.0.2:8003 --pki-dir "$pki/pki" \
    --raw-gbps "$gbps" --path-name "veth, unshaped: both ends and the wire share this machine's CPUs" "${args[@]}"

# The same comparison where the link, not the CPU, is the bottleneck, as on a vMotion
# network between two real hosts: the veth shaped to 10 Gbit/s (a 10 GbE vMotion NIC)
# by a token bucket on the source's side.
link=${VF_BENCH_LINK_GBIT:-10}
if [ "$link" != 0 ]; then
    ip netns exec "$nsa" tc qdisc replace dev "$p-a" root tbf rate "${link}gbit" \
        burst 4mb latency 10ms
    ip netns exec "$nsa" "$bin" --connect 10.99.0.2:8000 --tls-connect 10.99.0.2:8002 \
        --pki-dir "$pki/pki" --raw-gbps "$gbps" --encryption-only \
        --path-name "veth shaped to ${link} Gbit/s by tbf: the link is the bottleneck" \
        "${args[@]}"
fi
