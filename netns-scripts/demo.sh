#!/usr/bin/env bash
# The vMotion demo, start to finish: builds vfabric, brings the fabric up (switch, three
# namespaces, two hypervisor daemons), creates vm1 on silo104, pings it from the client
# namespace with the system's ping while tcpdump captures the fabric, migrates vm1 to
# silo105, and tells what happened in order. Cleans up unless --keep.
#
# Usage: demo.sh [--keep] [--json] [--interval S] [--memory-mb N] [--dirty-rate N]
#                [--announce rarp|garp|none]
#        demo.sh --scenario evacuate [--keep] [--parallel N]
#                 maintenance mode on four hosts instead (demo-evacuate.sh)
#   --keep         leave the topology up afterwards to try things by hand
#   --json         print one JSON object of the figures on stdout (the story goes to stderr)
#   --interval S   seconds between pings (default 0.01; the book's `ping -t` is 1)
#   --memory-mb N  vm1's memory (default 256)
#   --dirty-rate N pages per second vm1's vCPU rewrites (default 1000; "max" = unthrottled)
#   --announce M   how silo105 announces vm1 after resume (default rarp)
#
# Environment: VFABRIC_BIN=PATH runs that vfabric binary instead of building one with
# cargo; VF_PREFIX and VFABRIC_RUN_DIR choose the fabric's names and run directory.
# The capture (demo.pcap) and the timeline picture (timeline.svg) stay in the run
# directory.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

KEEP=0 JSON=0 INTERVAL=0.01 MEMORY=256 RATE=1000 ANNOUNCE=rarp
usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}:${2:-}" in
    --scenario:evacuate) shift 2; exec "$here/demo-evacuate.sh" "$@" ;;
    --scenario:migrate) shift 2 ;;
    --scenario:*) echo "demo.sh: unknown scenario ${2:-} (migrate or evacuate)" >&2; exit 2 ;;
esac
while [ $# -gt 0 ]; do
    case "$1" in
        --keep) KEEP=1 ;;
        --json) JSON=1 ;;
        --interval) INTERVAL=${2:?--interval needs a value}; shift ;;
        --memory-mb) MEMORY=${2:?--memory-mb needs a value}; shift ;;
        --dirty-rate) RATE=${2:?--dirty-rate needs a value}; shift ;;
        --announce) ANNOUNCE=${2:?--announce needs a value}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "demo.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

# With --json, stdout carries the JSON object alone: everything else goes to stderr.
if [ "$JSON" = 1 ]; then
    exec 3>&1 1>&2
fi

. "$here/lib.sh"
export VF_MIRROR=${VF_MIRROR:-$VF_PREFIX-mirror}
VM_IP=10.10.0.100
VM_MAC=02:00:0a:0a:00:64
PCAP="$VFABRIC_RUN_DIR/demo.pcap"
REPORT="$VFABRIC_RUN_DIR/demo.json"
SVG="$VFABRIC_RUN_DIR/timeline.svg"

step() { printf '\n== %s\n' "$*"; }

need_root
ensure_packages ip:iproute2 ping:iputils-ping tcpdump:tcpdump
if [ -n "${VFABRIC_BIN:-}" ]; then
    [ -x "$VFABRIC_BIN" ] || die "VFABRIC_BIN=$VFABRIC_BIN is not an executable"
    step "using $VFABRIC_BIN (VFABRIC_BIN; nothing to build)"
else
    command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) first, or set VFABRIC_BIN"
    step "building vfabric (cargo build --release; set VFABRIC_BIN to use a built binary)"
    (cd "$VF_REPO" && cargo build --release) || die "cargo build failed"
    VFABRIC_BIN="$VF_REPO/target/release/vfabric"
fi
export VFABRIC_BIN
vf() { "$VFABRIC_BIN" "$@"; }

TCPDUMP_PID=
cleanup() {
    local rc=$?
    if [ -n "$TCPDUMP_PID" ]; then
        kill -INT "$TCPDUMP_PID" 2>/dev/null || true
        wait "$TCPDUMP_PID" 2>/dev/null || true
    fi
    if [ "$KEEP" = 1 ] && [ "$rc" = 0 ]; then
        cat <<EOF

== the fabric is still up (--keep); try, as root:
   export VF_PREFIX=$VF_PREFIX VFABRIC_RUN_DIR=$VFABRIC_RUN_DIR PATH=$(dirname "$VFABRIC_BIN"):\$PATH
   vfabric vm list                                # where vm1 runs now
   vfabric fdb show                               # the switch's table
   ip netns exec $NS_CLIENT ping $VM_IP           # ping vm1
   vfabric migrate vm1 --to silo104               # move it back
   vfabric measure vm1 --to silo104 --svg back.svg  # ping from $NS_CLIENT, move it, draw it
   tcpdump -eni $VF_MIRROR                        # every frame on the fabric
   ip netns exec $NS_CLIENT vfabric udp $VM_IP get
   $here/down.sh                                  # remove it all
EOF
    else
        [ "$KEEP" = 1 ] && log "failed; removing the fabric despite --keep"
        "$here/down.sh" >/dev/null 2>&1 || "$here/down.sh" || true
    fi
}
trap cleanup EXIT

step "bringing the fabric up: switch, $NS_CLIENT, $NS_SILO104, $NS_SILO105, host daemons"
"$here/down.sh" >/dev/null 2>&1 || true
"$here/up.sh"

step "creating vm1 on silo104 ($MEMORY MB, sweep workload dirtying $RATE pages/s, $VM_IP)"
vf vm create vm1 --host silo104 --memory-mb "$MEMORY" --ip "$VM_IP" --mac "$VM_MAC" \
    --workload sweep --dirty-rate "$RATE"

step "capturing every frame of the fabric on the switch's mirror port $VF_MIRROR"
tcpdump -i "$VF_MIRROR" -n -U --immediate-mode -w "$PCAP" 2>"$VFABRIC_RUN_DIR/tcpdump.log" &
TCPDUMP_PID=$!
for _ in $(seq 50); do
    grep -q listening "$VFABRIC_RUN_DIR/tcpdump.log" 2>/dev/null && break
    sleep 0.1
done

step "pinging vm1 from $NS_CLIENT every $INTERVAL s and migrating it to silo105"
vf measure vm1 --to silo105 --client-netns "$NS_CLIENT" --interval "$INTERVAL" \
    --announce "$ANNOUNCE" --udp-check --ping-log "$VFABRIC_RUN_DIR/demo-ping.txt" \
    --json-out "$REPORT" --svg "$SVG"

kill -INT "$TCPDUMP_PID" 2>/dev/null || true
wait "$TCPDUMP_PID" 2>/dev/null || true
TCPDUMP_PID=

step "the switch's table now"
vf fdb show

step "the announce frames in the capture, from the resume on"
# The capture may also hold the last announces of vm1's creation (they run 800 ms after
# it starts): show the frames from the resume on, its time taken from the JSON report.
resume_us=$(grep -o '"resume_t_us":[0-9]*' "$REPORT" | head -1 | cut -d: -f2)
tcpdump -r "$PCAP" -nn -e -tt "ether proto 0x8035 or (arp and ether dst ff:ff:ff:ff:ff:ff and ether src $VM_MAC)" \
    2>/dev/null | awk -v t="${resume_us:-0}" '{ split($1, p, "."); if (p[1] * 1000000 + p[2] >= t) print }' |
    head -5 | while read -r ts rest; do
        printf '%s.%s %s\n' "$(date -d "@${ts%.*}" +%T)" "${ts#*.}" "$rest"
    done || true
cat <<EOF

The capture is kept: $PCAP
  read it with:  tcpdump -r $PCAP -nn -e
  the RARP only: tcpdump -r $PCAP -nn -e -xx 'ether proto 0x8035'
The timeline picture (open it in a browser): $SVG
ping's own output: $VFABRIC_RUN_DIR/demo-ping.txt; the figures and the timeline of events as
JSON: $REPORT; daemon logs (for people): $VFABRIC_RUN_DIR/*.log
Follow the daemons live in another shell: VFABRIC_RUN_DIR=$VFABRIC_RUN_DIR vfabric events
EOF
if [ "$KEEP" = 0 ]; then
    echo "To keep the fabric up and try things by hand (migrate back, ping, capture): $0 --keep"
fi
if [ "$JSON" = 1 ]; then
    cat "$REPORT" >&3
fi
