#!/usr/bin/env bash
# Soak benchmark (root): N live migrations back and forth between silo104 and silo105
# on a fabric of its own, with the client pinging the VM every 0.2 s throughout and a
# UDP `incr` after every move. Prints failed migrations, memory digest mismatches
# (source vs target), UDP counter errors, pings lost, the downtime distribution
# (median, p95, max) and the daemons' RSS and open-descriptor growth.
#
#   sudo bench/soak.sh                   # 200 migrations of a 64 MB VM
#   sudo bench/soak.sh -n 50 --memory-mb 256 --dirty-rate 5000
#
# Options: -n|--count N (200), --memory-mb MB (64), --dirty-rate PAGES/S (1000, the
# sweep workload), --interval S (ping interval, 0.2), --keep-log (keep the run
# directory). VF_PREFIX (default vsoak) and VFABRIC_RUN_DIR (default a fresh temp dir)
# choose the fabric, VFABRIC_BIN the binary (default: a release build of this tree).
set -euo pipefail
cd "$(dirname "$0")/.."

count=200 memory_mb=64 dirty_rate=1000 interval=0.2 keep_log=0
while [ $# -gt 0 ]; do
    case "$1" in
        -n|--count) count=$2; shift ;;
        --memory-mb) memory_mb=$2; shift ;;
        --dirty-rate) dirty_rate=$2; shift ;;
        --interval) interval=$2; shift ;;
        --keep-log) keep_log=1 ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/soak.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ "$count" =~ ^[0-9]+$ ]] && [ "$count" -ge 1 ] || { echo "bench/soak.sh: -n wants a positive count" >&2; exit 2; }

export VF_PREFIX=${VF_PREFIX:-vsoak}
export VFABRIC_RUN_DIR=${VFABRIC_RUN_DIR:-$(mktemp -d /tmp/vfabric-soak-XXXXXX)}
. netns-scripts/lib.sh
need_root
ensure_packages ip:iproute2 ping:iputils-ping
if [ -z "${VFABRIC_BIN:-}" ]; then
    cargo build --release --quiet
    VFABRIC_BIN=$PWD/target/release/vfabric
fi
export VFABRIC_BIN
vf() { "$VFABRIC_BIN" "$@"; }

ping_pid=
cleanup() {
    [ -n "$ping_pid" ] && kill "$ping_pid" 2>/dev/null || true
    netns-scripts/down.sh >/dev/null 2>&1 || true
    if [ "$keep_log" = 1 ]; then
        echo "logs kept in $VFABRIC_RUN_DIR"
    else
        rm -rf "$VFABRIC_RUN_DIR"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

netns-scripts/up.sh 2>/dev/null
vm_ip=10.10.0.100
vf vm create vm1 --host silo104 --ip "$vm_ip" --memory-mb "$memory_mb" \
    --workload sweep --dirty-rate "$dirty_rate" >/dev/null
for _ in $(seq 50); do
    ip netns exec "$NS_CLIENT" ping -c 1 -W 1 -q "$vm_ip" >/dev/null 2>&1 && break
done

# RSS (kB) and open descriptors of each daemon.
usage() {
    local d pid
    for d in switch silo104 silo105; do
        read -r pid _ <"$VFABRIC_RUN_DIR/$d.pid"
        printf '%s %s %s\n' "$d" \
            "$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status")" \
            "$(ls "/proc/$pid/fd" | wc -l)"
    done | sort
}

out=$VFABRIC_RUN_DIR/soak
mkdir -p "$out"
ip netns exec "$NS_CLIENT" ping -n -i "$interval" "$vm_ip" >"$out/ping.txt" 2>&1 &
ping_pid=$!
sleep 1

# Resident memory includes the guest memory of the host holding the VM, and the sweep
# makes more of it resident until it has covered all of it once: the baseline waits for
# one sweep (at most 30 s), and both samples are taken with the VM on silo104 (after an
# even number of moves), so that growth means the daemons', not the guest's.
warmup_s=$(awk -v m="$memory_mb" -v r="$dirty_rate" 'BEGIN { w = r > 0 ? m * 256 / r : 0; print int(w < 30 ? w : 30) }')
last_even=$((count - count % 2))
failures=0 mismatches=0 udp_errors=0 counter=0 baseline_at=
: >"$out/downtime_us"
hosts=(silo105 silo104)
t0=$(date +%s.%N)
for i in $(seq "$count"); do
    to=${hosts[$(((i - 1) % 2))]}
    if s=$(vf migrate vm1 --to "$to" --json 2>"$out/err"); then
        src=$(grep -o '"memory_sha256_source":"[0-9a-f]*"' <<<"$s" | cut -d'"' -f4)
        dst=$(grep -o '"memory_sha256_target":"[0-9a-f]*"' <<<"$s" | cut -d'"' -f4)
        if [ -z "$src" ] || [ "$src" != "$dst" ]; then
            mismatches=$((mismatches + 1))
            echo "migration $i to $to: memory digest source ${src:-none} target ${dst:-none}"
        fi
        grep -o '"downtime_us":[0-9]*' <<<"$s" | cut -d: -f2 >>"$out/downtime_us"
    else
        failures=$((failures + 1))
        echo "migration $i to $to failed: $(cat "$out/err")"
    fi
    if r=$(ip netns exec "$NS_CLIENT" "$VFABRIC_BIN" udp "$vm_ip" incr 2>&1); then
        counter=$((counter + 1))
        if [ "$r" != "counter $counter" ]; then
            udp_errors=$((udp_errors + 1))
            echo "migration $i: UDP answered \"$r\", expected \"counter $counter\""
            counter=${r#counter }
        fi
    else
        udp_errors=$((udp_errors + 1))
        echo "migration $i: UDP incr failed: $r"
    fi
    # The daemons have each sent and received a VM: what they hold now is the baseline.
    if [ $((i % 2)) -eq 0 ] && [ -z "$baseline_at" ]; then
        since=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { print int(b - a) }')
        if [ "$since" -ge "$warmup_s" ] || [ "$i" -eq "$last_even" ]; then
            usage >"$out/usage.start"
            baseline_at=$i
        fi
    fi
    if [ "$i" -eq "$last_even" ]; then usage >"$out/usage.end"; fi
    if [ $((i % 50)) -eq 0 ]; then echo "  $i/$count migrations"; fi
done
elapsed=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
if [ -z "$baseline_at" ]; then
    usage >"$out/usage.start"
    usage >"$out/usage.end"
    baseline_at=$count last_even=$count
fi
sleep 1
kill -INT "$ping_pid" 2>/dev/null || true
wait "$ping_pid" 2>/dev/null || true
ping_pid=

sent=$(awk '/packets transmitted/ { print $1 }' "$out/ping.txt")
received=$(awk '/packets transmitted/ { print $4 }' "$out/ping.txt")

echo
echo "soak: $count migrations of a $memory_mb MB VM (sweep, $dirty_rate pages/s) in $elapsed s"
echo "  failed migrations        $failures"
echo "  memory digest mismatches $mismatches"
echo "  UDP counter errors       $udp_errors (counter $counter after the last move)"
echo "  pings lost               $((sent - received)) of $sent at ${interval} s"
sort -n "$out/downtime_us" | awk '
    { v[NR] = $1 }
    END {
        if (NR == 0) { print "  downtime                 no successful migration"; exit }
        p95 = int(0.95 * NR + 0.999); if (p95 < 1) p95 = 1; if (p95 > NR) p95 = NR
        med = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "  downtime (quiesce -> resume, %d moves): median %.1f ms, p95 %.1f ms, max %.1f ms\n",
            NR, med / 1000, v[p95] / 1000, v[NR] / 1000
    }'
echo "  daemon      RSS kB (after move $baseline_at -> after move $last_even)   open fds"
join "$out/usage.start" "$out/usage.end" | awk '{
    printf "  %-8s %10d -> %-10d (%+d)   %5d -> %-5d (%+d)\n", $1, $2, $4, $4 - $2, $3, $5, $5 - $3
}'
