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
#   VF_HOSTS         0: up.sh starts no host daemons (same as up.sh --no-hosts)
#   VF_HOST_ARGS     extra arguments for both `vfabric host` daemons (e.g. --announce none)
#   VF_HOST_CAPACITY_MB  memory each host offers to VMs (default 4096)

VF_PREFIX=${VF_PREFIX:-vf}
VFABRIC_RUN_DIR=${VFABRIC_RUN_DIR:-/run/vfabric}
export VFABRIC_RUN_DIR
VF_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

VF_HOST_CAPACITY_MB=${VF_HOST_CAPACITY_MB:-4096}
# The shared storage both hosts see (VM disk files and their locks).
VF_DATASTORE="$VFABRIC_RUN_DIR/datastore"

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

# Sets VFABRIC_BIN, building the release binary if it is missing.
ensure_bin() {
    if [ -n "${VFABRIC_BIN:-}" ]; then
        [ -x "$VFABRIC_BIN" ] || die "VFABRIC_BIN=$VFABRIC_BIN is not an executable"
        return 0
    fi
    VFABRIC_BIN="$VF_REPO/target/release/vfabric"
    if [ ! -x "$VFABRIC_BIN" ]; then
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

# kill_pidfile FILE — SIGTERM the process (SIGKILL after 5 s) if it is still the one
# recorded, then remove FILE.
kill_pidfile() {
    local pid= start= now i
    read -r pid start <"$1" 2>/dev/null || true
    rm -f "$1"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    now=$(proc_start "$pid") || return 0
    if [ -n "$start" ] && [ "$now" != "$start" ]; then
        return 0    # the recorded process is gone; this pid belongs to another one
    fi
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "pid $pid ignored SIGTERM; killing it"
    kill -KILL "$pid" 2>/dev/null || true
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
