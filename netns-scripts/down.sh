#!/usr/bin/env bash
# Tears the fabric down, whatever topology file up.sh built it from: stops every daemon
# with a pid file in the run directory (both switches, every host), kills whatever still
# runs inside the prefix's namespaces, deletes those namespaces (their veth and TAP
# interfaces go with them) and removes sockets, pid files and the recorded plan
# (topology.sh), and the same in another simulated machine's run directory
# ($VFABRIC_RUN_DIR/machine-NAME) with the remotes file. Logs stay.
# Idempotent and safe after a crash: every step tolerates things already gone.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

stop_daemons() {
    local files=()
    [ -d "$VFABRIC_RUN_DIR" ] || return 0
    shopt -s nullglob
    files=("$VFABRIC_RUN_DIR"/*.pid "$VFABRIC_RUN_DIR"/machine-*/*.pid)
    shopt -u nullglob
    [ ${#files[@]} -eq 0 ] || kill_pidfile "${files[@]}"
    return 0
}

delete_namespaces() {
    local ns pids
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${VF_PREFIX}-" || true); do
        # A namespace outlives `ip netns del` while a process runs in it.
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        if [ -n "$pids" ]; then
            # shellcheck disable=SC2086
            kill -TERM $pids 2>/dev/null || true
            sleep 0.2
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
        fi
        ip netns del "$ns" 2>/dev/null || true
    done
}

remove_leftovers() {
    [ -d "$VFABRIC_RUN_DIR" ] || return 0
    local m
    for m in "$VFABRIC_RUN_DIR"/machine-*/; do
        # Another simulated machine's run directory: the same, and its copies of keys.
        [ -d "$m" ] || continue
        rm -f "$m"*.sock "$m"*.pid "$m"*.env
        rm -rf "${m}pki"
        rmdir "$m" 2>/dev/null || true
    done
    rm -f "$VFABRIC_RUN_DIR"/*.sock "$VFABRIC_RUN_DIR"/*.pid "$VFABRIC_RUN_DIR"/*.env
    rm -f "$VFABRIC_RUN_DIR/remotes"    # the other machines' control addresses
    rm -f "$VFABRIC_RUN_DIR/topology.sh"    # the plan up.sh built from
    rm -rf "$VF_DATASTORE"
    rm -rf "$VFABRIC_RUN_DIR/pki"       # the fabric's CA and host keys go with it
    rmdir "$VFABRIC_RUN_DIR" 2>/dev/null || true    # only if empty: logs are kept
}

main() {
    need_root
    ensure_packages ip:iproute2
    stop_daemons
    delete_namespaces
    remove_leftovers
    log "down: prefix $VF_PREFIX, run dir $VFABRIC_RUN_DIR"
}

main "$@"
