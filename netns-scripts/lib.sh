# shellcheck shell=bash
# Shared settings and helpers of the topology scripts. Source it; do not run it.
#
# Environment:
#   VF_PREFIX        namespace prefix (default vf: vf-client, vf-silo104, vf-silo105)
#   VFABRIC_RUN_DIR  pid files, logs and control sockets (default /run/vfabric)
#   VFABRIC_BIN      the vfabric binary (default: the repo's target/release/vfabric,
#                    built with cargo if missing)
#   VF_MIRROR        if set, the switch also creates a mirror TAP of that name in the
#                    root namespace (tcpdump -i "$VF_MIRROR" sees every frame)
#   VF_SWITCH_ARGS   extra arguments for `vfabric switch` (e.g. --ageing-secs 30)
#   VF_VMOTION_SWITCH_ARGS  extra arguments for the vMotion network's switch, when the
#                    topology has one
#   VF_HOSTS         0: up.sh starts no host daemons (same as up.sh --no-hosts)
#   VF_HOST_ARGS     extra arguments for every `vfabric host` daemon (e.g. --announce none),
#                    after those the topology file gives
#   VF_HOST_CAPACITY_MB  memory a host offers to VMs when its topology entry gives no
#                    capacity_mb (default 4096)

VF_PREFIX=${VF_PREFIX:-vf}
VFABRIC_RUN_DIR=${VFABRIC_RUN_DIR:-/run/vfabric}
export VFABRIC_RUN_DIR
VF_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

VF_HOST_CAPACITY_MB=${VF_HOST_CAPACITY_MB:-4096}
# The shared storage both hosts see (VM disk files and their locks).
VF_DATASTORE="$VFABRIC_RUN_DIR/datastore"

# The vMotion network's switch, when the topology has one (its socket: vmotion.sock).
VMOTION_SWITCH=vmotion

# The namespaces of the default topology (up.sh with no file), for the scripts that
# drive it (demo.sh, benchmarks). up.sh itself builds from the plan of its file.
NS_CLIENT="$VF_PREFIX-client"
NS_SILO104="$VF_PREFIX-silo104"
NS_SILO105="$VF_PREFIX-silo105"
ALL_NS=("$NS_CLIENT" "$NS_SILO104" "$NS_SILO105")

# Addresses (see the design brief): the client and the hosts' uplinks share 10.10.0.0/24,
# the vMotion network between the hosts is 10.20.0.0/24.
CLIENT_IP=10.10.0.1/24
SILO104_IP=10.10.0.104/24
SILO105_IP=10.10.0.105/24
SILO104_VMK=10.20.0.104/24
SILO105_VMK=10.20.0.105/24

log() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (creates namespaces and TAP devices); try: sudo $0"
}

# ensure_packages CMD:PACKAGE ... — installs the packages whose command is missing.
ensure_packages() {
    local missing=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -eq 0 ] && [ -f /etc/debian_version ] && command -v apt-get >/dev/null; then
        log "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
            || die "apt-get install ${missing[*]} failed"
    else
        die "missing packages; install them with: apt-get install ${missing[*]}"
    fi
}

# Sets VFABRIC_BIN, building the release binary if it is missing or older than the
# sources (the scripts call subcommands an old binary may lack).
ensure_bin() {
    if [ -n "${VFABRIC_BIN:-}" ]; then
        [ -x "$VFABRIC_BIN" ] || die "VFABRIC_BIN=$VFABRIC_BIN is not an executable"
        return 0
    fi
    VFABRIC_BIN="$VF_REPO/target/release/vfabric"
    if [ ! -x "$VFABRIC_BIN" ] || [ -n "$(find "$VF_REPO/src" "$VF_REPO/Cargo.toml" \
        "$VF_REPO/netns-scripts/topologies" -newer "$VFABRIC_BIN" -print -quit 2>/dev/null)" ]; then
        command -v cargo >/dev/null || die "$VFABRIC_BIN missing and cargo not found"
        log "building $VFABRIC_BIN"
        (cd "$VF_REPO" && cargo build --release --quiet) || die "cargo build failed"
    fi
}

# Start time of a process (field 22 of /proc/PID/stat), to tell a pid from a reused one.
proc_start() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }          # drop "pid (comm) ", comm may hold spaces
    set -- $stat               # field 3 of /proc/PID/stat is now $1
    echo "${20}"
}

# write_pidfile NAME PID — records PID and its start time in $VFABRIC_RUN_DIR/NAME.pid.
write_pidfile() {
    echo "$2 $(proc_start "$2")" >"$VFABRIC_RUN_DIR/$1.pid"
}

# kill_pidfile FILE... — SIGTERM each process (SIGKILL after 5 s) if it is still the one
# recorded, then remove its FILE. They are signalled together and waited for together:
# a daemon takes a second or two to stop, and a fabric may have many.
kill_pidfile() {
    local f pid start now i pids=() left
    for f in "$@"; do
        pid= start=
        read -r pid start <"$f" 2>/dev/null || true
        rm -f "$f"
        [[ "$pid" =~ ^[0-9]+$ ]] || continue
        now=$(proc_start "$pid") || continue
        if [ -n "$start" ] && [ "$now" != "$start" ]; then
            continue    # the recorded process is gone; this pid belongs to another one
        fi
        kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    done
    for i in $(seq 50); do
        left=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
        pids=("${left[@]}")
        [ ${#pids[@]} -eq 0 ] && return 0
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        log "pid $pid ignored SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    done
}

# wait_for_socket PATH PID LOGFILE — waits up to 10 s for the daemon's control socket.
wait_for_socket() {
    local i
    for i in $(seq 100); do
        [ -S "$1" ] && return 0
        if ! kill -0 "$2" 2>/dev/null; then
            tail -n 5 "$3" >&2 2>/dev/null || true
            die "daemon exited before creating $1 (log: $3)"
        fi
        sleep 0.1
    done
    die "timed out waiting for $1 (log: $3)"
}

ns_exists() { [ -e "/run/netns/$1" ]; }
