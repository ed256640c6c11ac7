#!/usr/bin/env bash
# A real VM migrated on vfabric: a tiny Linux guest (Debian's kernel, a busybox
# initramfs) booted in QEMU on host A's vfabric port, pinged from the client namespace,
# then live-migrated by QEMU itself (QMP `migrate`) to a QEMU on host B's port. Tells
# the same loss-window story as demo.sh: QEMU's downtime, the pings lost, QEMU's RARP
# frames as the client saw them, and vfabric's FDB move with its lag after QEMU resumed.
# Cleans up unless --keep.
#
# Usage: qemu-demo.sh [--keep] [--interval S] [--dirty-mb N]
#   --keep         leave the fabric and the destination QEMU up afterwards
#   --interval S   seconds between pings (default 0.01)
#   --dirty-mb N   MiB of memory the guest rewrites over and over (default 8; 0: none)
#
# Each QEMU plugs its NIC straight into the switch: `--port silo104-vm=qemu-stream:PATH`
# on the switch, `-netdev stream,server=off,addr.type=unix,addr.path=PATH` on QEMU; no
# TAP, no kernel bridge. KVM is tried first when /dev/kvm is there; TCG otherwise, or
# if KVM cannot start the guest (QEMU_ACCEL=kvm|tcg forces one).
#
# Environment: VFABRIC_BIN=PATH runs that vfabric binary instead of building one;
# VF_PREFIX and VFABRIC_RUN_DIR choose the fabric's names and run directory;
# VF_GUEST_CACHE where the guest's kernel and initramfs are kept (default
# /var/cache/vfabric/guest). The capture, the ping log, QEMU's consoles and the events
# stay in the run directory.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

KEEP=0 INTERVAL=0.01 DIRTY=8
usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --keep) KEEP=1 ;;
        --interval) INTERVAL=${2:?--interval needs a value}; shift ;;
        --dirty-mb) DIRTY=${2:?--dirty-mb needs a value}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "qemu-demo.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

. "$here/lib.sh"
. "$here/qemu-lib.sh"
VM_IP=10.10.0.100
VM_MAC=52:54:00:0a:0a:64
Q="$VFABRIC_RUN_DIR/qemu"
SOCK_A="$Q/silo104-vm.sock"
SOCK_B="$Q/silo105-vm.sock"
MIG="$Q/migrate.sock"
PCAP="$VFABRIC_RUN_DIR/qemu-demo.pcap"
PINGLOG="$VFABRIC_RUN_DIR/qemu-demo-ping.txt"
EVENTS="$VFABRIC_RUN_DIR/qemu-demo-events.jsonl"

step() { printf '\n== %s\n' "$*"; }

need_root
ensure_packages ip:iproute2 ping:iputils-ping tcpdump:tcpdump
ensure_qemu_packages
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

PIDS=()
QEMU_A= QEMU_B=
# stop PID... — SIGINT (ping and tcpdump finish their output), SIGTERM after 1 s,
# SIGKILL after 2 s.
stop() {
    local p i
    for p in "$@"; do kill -INT "$p" 2>/dev/null || true; done
    for p in "$@"; do
        for i in $(seq 20); do
            kill -0 "$p" 2>/dev/null || break
            [ "$i" = 10 ] && kill -TERM "$p" 2>/dev/null
            sleep 0.1
        done
        kill -KILL "$p" 2>/dev/null || true
    done
}
cleanup() {
    local rc=$? p
    exec 7>&- 2>/dev/null || true
    stop "${PIDS[@]}"
    if [ "$KEEP" = 1 ] && [ "$rc" = 0 ]; then
        cat <<EOF

== the fabric and the migrated guest are still up (--keep); try, as root:
   export VF_PREFIX=$VF_PREFIX VFABRIC_RUN_DIR=$VFABRIC_RUN_DIR PATH=$(dirname "$VFABRIC_BIN"):\$PATH
   ip netns exec $NS_CLIENT ping $VM_IP            # the guest, now behind silo105-vm
   vfabric fdb show; vfabric ports                  # the switch's table and counters
   echo '{"execute":"qmp_capabilities"}{"execute":"query-status"}' | socat - UNIX-CONNECT:$Q/b.qmp
   kill $QEMU_B; $here/down.sh                      # remove it all
EOF
        return
    fi
    [ "$KEEP" = 1 ] && log "failed; removing everything despite --keep"
    stop $QEMU_A $QEMU_B
    "$here/down.sh" >/dev/null 2>&1 || "$here/down.sh" || true
}
trap cleanup EXIT

step "building the guest: Debian's kernel + a busybox initramfs (cached in $VF_GUEST_CACHE)"
case "$DIRTY" in ''|*[!0-9]*) die "--dirty-mb takes a whole number" ;; esac
GUEST_IP="$VM_IP/24" GUEST_DIRTY_MB=$DIRTY build_guest
log "kernel $GUEST_KERNEL, initramfs $GUEST_INITRD"

step "bringing the fabric up: the switch with two QEMU ports (silo104-vm, silo105-vm), $NS_CLIENT"
"$here/down.sh" >/dev/null 2>&1 || true
mkdir -p "$Q"
VF_HOSTS=0 VF_SWITCH_ARGS="--port silo104-vm=qemu-stream:$SOCK_A --port silo105-vm=qemu-stream:$SOCK_B ${VF_SWITCH_ARGS:-}" \
    "$here/up.sh"

step "booting the guest in QEMU on silo104's port ($VM_IP, $VM_MAC)"
qemu_boot a "$SOCK_A" "$VM_MAC" "$Q"
QEMU_A=$QEMU_PID
log "booted with $QEMU_ACCEL in $BOOT_S s (console: $Q/a.console)"
for _ in $(seq 50); do
    ip netns exec "$NS_CLIENT" ping -c 1 -W 1 "$VM_IP" >/dev/null 2>&1 && break
    sleep 0.2
done
ip netns exec "$NS_CLIENT" ping -c 3 -i 0.2 "$VM_IP" || die "the guest does not answer ping"

step "starting the destination QEMU on silo105's port, waiting for the migration"
QEMU_B=$(qemu_start b "$SOCK_B" "$VM_MAC" "$Q" -incoming "unix:$MIG")
qmp_wait "$Q/a.qmp" || die "no QMP on the source QEMU"
qmp_wait "$Q/b.qmp" || die "no QMP on the destination QEMU"
# The destination's QMP events (RESUME) as they come, on a connection held open by
# fd 7 (closing it ends socat).
rm -f "$Q/b-qmp.in" && mkfifo "$Q/b-qmp.in"
socat -t 0.5 - "UNIX-CONNECT:$Q/b.qmp" <"$Q/b-qmp.in" >"$Q/b-qmp.jsonl" 2>/dev/null &
PIDS+=($!)
exec 7>"$Q/b-qmp.in"
printf '{"execute":"qmp_capabilities"}\n' >&7

step "capturing on $NS_CLIENT's eth0, following the switch's events, pinging every $INTERVAL s"
ip netns exec "$NS_CLIENT" tcpdump -i eth0 -n -U --immediate-mode -w "$PCAP" \
    2>"$VFABRIC_RUN_DIR/qemu-demo-tcpdump.log" &
PIDS+=($!)
vf events --json --switch >"$EVENTS" 2>"$VFABRIC_RUN_DIR/qemu-demo-events.err" &
PIDS+=($!)
for _ in $(seq 100); do
    grep -q listening "$VFABRIC_RUN_DIR/qemu-demo-tcpdump.log" 2>/dev/null \
        && grep -q following "$VFABRIC_RUN_DIR/qemu-demo-events.err" 2>/dev/null && break
    sleep 0.05
done
ip netns exec "$NS_CLIENT" ping -D -O -i "$INTERVAL" -W 1 "$VM_IP" >"$PINGLOG" 2>&1 &
PING_PID=$!
PIDS+=($PING_PID)
sleep 1

step "migrating with QEMU's own live migration (QMP migrate, unix:$MIG)"
qmp "$Q/a.qmp" migrate "{\"uri\":\"unix:$MIG\"}" >/dev/null
STATUS=
for _ in $(seq 1200); do
    R=$(qmp "$Q/a.qmp" query-migrate)
    STATUS=$(jq -r '.return.status // empty' <<<"$R")
    case "$STATUS" in completed|failed|cancelled) break ;; esac
    sleep 0.1
done
[ "$STATUS" = completed ] || die "migration $STATUS: $R"
DOWNTIME=$(jq -r '.return.downtime' <<<"$R")
TOTAL=$(jq -r '.return["total-time"]' <<<"$R")
TRANSFERRED=$(jq -r '.return.ram.transferred' <<<"$R")
# QEMU's announce schedule ends 800 ms after resume; let the pings run past it.
sleep 2
stop "$PING_PID"
sleep 0.5
exec 7>&-
stop "${PIDS[@]}"
PIDS=()
# The source QEMU is done (postmigrate); it quits as a real one would be told to.
stop "$QEMU_A"
QEMU_A=
ip netns exec "$NS_CLIENT" ping -c 3 -i 0.2 "$VM_IP" >/dev/null \
    || die "the guest does not answer after the migration (console: $Q/b.console)"

step "what happened"
RESUME_US=$(jq -r 'select(.event == "RESUME") | .timestamp.seconds * 1000000 + .timestamp.microseconds' \
    "$Q/b-qmp.jsonl" | head -1)
MOVE=$(jq -c --arg mac "$VM_MAC" 'select(.event == "mac_moved" and .mac == $mac)' "$EVENTS" | head -1)
[ -n "$MOVE" ] || die "the switch never moved $VM_MAC (events: $EVENTS)"
MOVE_US=$(jq -r .t_us <<<"$MOVE")
RARPS=$(tcpdump -r "$PCAP" -nn -e -tt "ether proto 0x8035 and ether src $VM_MAC" 2>/dev/null || true)
FIRST_RARP_US=$(awk 'NR == 1 { split($1, a, "."); print a[1] a[2] }' <<<"$RARPS")
# ping's own summary line: "N packets transmitted, M received".
read -r TX RX < <(awk '/packets transmitted/ { print $1, $4 }' "$PINGLOG")
LOST=$((TX - RX))
# The gap: the last reply before it and the first after (ping -D timestamps).
GAP_MS=$(awk -F'[][]' '/bytes from/ { t = $2; if (p != "" && t - p > g) g = t - p; p = t }
    END { printf "%.1f", g * 1000 }' "$PINGLOG")

cat <<EOF
QEMU ($QEMU_ACCEL): migration took $TOTAL ms, $((TRANSFERRED / 1048576)) MiB sent; downtime (QEMU's own figure) $DOWNTIME ms
pings: $TX sent every $INTERVAL s, $RX answered, $LOST lost; longest gap between replies $GAP_MS ms
QEMU's RARP frames as $NS_CLIENT saw them ($(grep -c . <<<"$RARPS") frames):
$(sed 's/^/  /' <<<"$RARPS")
vfabric: $(jq -r '"\(.mac) moved \(.from) -> \(.to) on a \(.ethertype) frame"' <<<"$MOVE")
  at +$((MOVE_US - RESUME_US)) µs from QEMU's RESUME event on the destination (QEMU's
  own time to write its first RARP after resuming is in that figure: the switch stamps
  the move as it reads the frame); the client saw that RARP, forwarded after the
  move, $((FIRST_RARP_US - MOVE_US)) µs after it
EOF

cat <<EOF

The capture: $PCAP (tcpdump -r $PCAP -nn -e -xx 'ether proto 0x8035')
ping's output: $PINGLOG; the switch's events: $EVENTS; QEMU consoles and logs: $Q/
EOF
if [ "$KEEP" = 0 ]; then
    echo "To keep the fabric and the migrated guest up: $0 --keep"
fi
