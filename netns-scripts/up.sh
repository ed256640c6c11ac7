#!/usr/bin/env bash
# Builds the fabric: three namespaces (client, silo104, silo105), the vMotion veth pair
# between the hosts, the vfabric switch joining the client's eth0 and the hosts'
# vmnic0 through TAP ports, and a hypervisor daemon in each host namespace.
# Settings: see lib.sh. Undo with down.sh.
#
# Usage: up.sh [--no-hosts]   (--no-hosts, or VF_HOSTS=0: the switch and namespaces only)
#        up.sh --restart-switch
#            Stops the running switch (if any) and starts it again with the same ports,
#            then re-applies the uplink addresses and links in the namespaces. Host
#            daemons and their VMs keep running; they re-bind to the new interfaces.
#        up.sh --restart-host NAME   (NAME: silo104 or silo105) stops that host's daemon
#                                    if it still runs and starts a new one, as up.sh did
#
# Steps run in order from main(); each is a function, so more (host daemons, demo
# traffic) slot in as one more function and one more line in main().
set -Eeuo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

check_not_up() {
    local ns
    for ns in "${ALL_NS[@]}"; do
        ns_exists "$ns" && die "namespace $ns exists already; run down.sh first"
    done
    if [ -S "$VFABRIC_RUN_DIR/switch.sock" ]; then
        die "$VFABRIC_RUN_DIR/switch.sock exists; run down.sh first"
    fi
    return 0
}

create_namespaces() {
    local ns
    for ns in "${ALL_NS[@]}"; do
        ip netns add "$ns"
        ip -n "$ns" link set lo up
    done
}

# The veth pair is created directly inside the two namespaces, so its ends never exist
# in the root namespace and parallel topologies cannot collide on names.
create_vmotion_link() {
    ip link add vmk1 netns "$NS_SILO104" type veth peer name vmk1 netns "$NS_SILO105"
}

# start_switch [append] — starts the switch with the three ports; its options (VF_MIRROR,
# VF_SWITCH_ARGS) are kept in switch.env so that --restart-switch uses the same ones.
start_switch() {
    local pid mirror=()
    # Born 0700 if we make it; an existing directory keeps its mode (it is not ours).
    [ -d "$VFABRIC_RUN_DIR" ] || mkdir -p -m 0700 "$VFABRIC_RUN_DIR"
    [ -n "${VF_MIRROR:-}" ] && mirror=(--mirror "$VF_MIRROR")
    printf 'VF_MIRROR=%q\nVF_SWITCH_ARGS=%q\n' "${VF_MIRROR:-}" "${VF_SWITCH_ARGS:-}" \
        >"$VFABRIC_RUN_DIR/switch.env"
    if [ "${1:-}" = append ]; then exec 3>>"$VFABRIC_RUN_DIR/switch.log"; else exec 3>"$VFABRIC_RUN_DIR/switch.log"; fi
    # shellcheck disable=SC2086 # VF_SWITCH_ARGS is a list of words
    setsid nohup "$VFABRIC_BIN" switch --name switch \
        --port "client=$NS_CLIENT:eth0" \
        --port "silo104=$NS_SILO104:vmnic0" \
        --port "silo105=$NS_SILO105:vmnic0" \
        "${mirror[@]}" ${VF_SWITCH_ARGS:-} \
        >&3 2>&1 </dev/null &
    pid=$!
    exec 3>&-
    write_pidfile switch "$pid"
    wait_for_socket "$VFABRIC_RUN_DIR/switch.sock" "$pid" "$VFABRIC_RUN_DIR/switch.log"
}

# The switch's TAP interfaces: created by the switch, gone when it stops.
configure_uplinks() {
    ip -n "$NS_CLIENT" addr add "$CLIENT_IP" dev eth0
    ip -n "$NS_CLIENT" link set eth0 up
    ip -n "$NS_SILO104" addr add "$SILO104_IP" dev vmnic0
    ip -n "$NS_SILO105" addr add "$SILO105_IP" dev vmnic0
    ip -n "$NS_SILO104" link set vmnic0 up
    ip -n "$NS_SILO105" link set vmnic0 up
}

configure_vmotion() {
    ip -n "$NS_SILO104" addr add "$SILO104_VMK" dev vmk1
    ip -n "$NS_SILO105" addr add "$SILO105_VMK" dev vmk1
    ip -n "$NS_SILO104" link set vmk1 up
    ip -n "$NS_SILO105" link set vmk1 up
}

# The switch's interfaces vanish as its TAP fds close; a new switch cannot name its
# own the same until they have.
wait_for_uplinks_gone() {
    local i
    for i in $(seq 100); do
        if ! ip -n "$NS_CLIENT" link show eth0 >/dev/null 2>&1 \
            && ! ip -n "$NS_SILO104" link show vmnic0 >/dev/null 2>&1 \
            && ! ip -n "$NS_SILO105" link show vmnic0 >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    die "the old switch's interfaces did not go away"
}

# Brings the switch back with the same ports, whether it still runs or died. The host
# daemons notice their uplink return and re-bind their VMs' NICs by themselves.
restart_switch() {
    local ns
    for ns in "${ALL_NS[@]}"; do
        ns_exists "$ns" || die "namespace $ns does not exist; run up.sh first"
    done
    if [ -e "$VFABRIC_RUN_DIR/switch.pid" ]; then kill_pidfile "$VFABRIC_RUN_DIR/switch.pid"; fi
    wait_for_uplinks_gone
    # The old switch is gone: a socket file left by a crash is stale.
    rm -f "$VFABRIC_RUN_DIR/switch.sock"
    # The options up.sh used, unless given again.
    if [ -z "${VF_MIRROR+x}${VF_SWITCH_ARGS+x}" ] && [ -f "$VFABRIC_RUN_DIR/switch.env" ]; then
        # shellcheck disable=SC1091
        . "$VFABRIC_RUN_DIR/switch.env"
    fi
    start_switch append
    configure_uplinks
    log "switch restarted; log in $VFABRIC_RUN_DIR/switch.log"
}

# One hypervisor daemon per host namespace: vMotion listener on vmk1, VM NICs on vmnic0,
# a datastore directory both hosts see.
start_host() {
    local host=$1 ns vmk pid
    case "$host" in
        silo104) ns=$NS_SILO104 vmk=${SILO104_VMK%/*} ;;
        silo105) ns=$NS_SILO105 vmk=${SILO105_VMK%/*} ;;
        *) die "unknown host $host (expected silo104 or silo105)" ;;
    esac
    mkdir -p "$VF_DATASTORE"
    # A daemon killed outright leaves its socket behind; the new one must not be
    # mistaken for ready because of it. Its log is appended to, not replaced.
    rm -f "$VFABRIC_RUN_DIR/$host.sock"
    # shellcheck disable=SC2086 # VF_HOST_ARGS is a list of words
    setsid nohup ip netns exec "$ns" "$VFABRIC_BIN" host --name "$host" \
        --vmotion-addr "$vmk:8000" --uplink vmnic0 \
        --capacity-mb "$VF_HOST_CAPACITY_MB" --datastore "$VF_DATASTORE" \
        ${VF_HOST_ARGS:-} \
        >>"$VFABRIC_RUN_DIR/$host.log" 2>&1 </dev/null &
    pid=$!
    write_pidfile "$host" "$pid"
    wait_for_socket "$VFABRIC_RUN_DIR/$host.sock" "$pid" "$VFABRIC_RUN_DIR/$host.log"
}

start_hosts() {
    local host
    # The fabric CA and one certificate per host, for authenticated, encrypted vMotion
    # ($VFABRIC_RUN_DIR/pki, 0700; files 0600). An existing CA is kept.
    "$VFABRIC_BIN" pki init >/dev/null
    "$VFABRIC_BIN" pki issue silo104 silo105 >/dev/null
    for host in silo104 silo105; do
        : >"$VFABRIC_RUN_DIR/$host.log"
        start_host "$host"
    done
}

# Replaces one host's daemon (a crashed one, or one to restart): the fabric must be up.
restart_host() {
    local host=$1
    ns_exists "$NS_CLIENT" || die "the fabric ($VF_PREFIX) is not up"
    [ -f "$VFABRIC_RUN_DIR/$host.pid" ] && kill_pidfile "$VFABRIC_RUN_DIR/$host.pid"
    start_host "$host"
    log "restarted $host; log in $VFABRIC_RUN_DIR/$host.log"
}

on_error() {
    log "failed; removing what was created"
    "$(dirname "${BASH_SOURCE[0]}")/down.sh" || true
}

main() {
    local hosts=${VF_HOSTS:-1}
    case "${1:-}" in
        --no-hosts) hosts=0 ;;
        --restart-switch)
            need_root
            ensure_bin
            restart_switch
            exit 0
            ;;
        --restart-host)
            [ -n "${2:-}" ] || die "--restart-host needs a host name"
            need_root
            ensure_bin
            restart_host "$2"
            exit 0
            ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        "") ;;
        *) die "unknown option $1 (try --help)" ;;
    esac
    need_root
    ensure_packages ip:iproute2 ping:iputils-ping tcpdump:tcpdump
    ensure_bin
    check_not_up
    # From here on, any failure (a failed command or `die`) removes what was created.
    trap 'rc=$?; [ "$rc" -eq 0 ] || on_error' EXIT
    create_namespaces
    create_vmotion_link
    start_switch
    configure_uplinks
    configure_vmotion
    if [ "$hosts" = 1 ]; then start_hosts; fi
    trap - EXIT
    log "up: namespaces ${ALL_NS[*]}; logs in $VFABRIC_RUN_DIR"
    # The CLI finds this fabric through the same variables: say so when they differ
    # from the defaults, so that every hint works when pasted as it is.
    local env=
    [ "$VF_PREFIX" = vf ] || env+="VF_PREFIX=$VF_PREFIX "
    [ "$VFABRIC_RUN_DIR" = /run/vfabric ] || env+="VFABRIC_RUN_DIR=$VFABRIC_RUN_DIR "
    log "try: ip netns exec $NS_CLIENT ping ${SILO104_IP%/*}; ${env}$VFABRIC_BIN fdb show"
    if [ "$hosts" = 1 ]; then
        log "     ${env}$VFABRIC_BIN vm create vm1 --host silo104 --ip 10.10.0.100; ip netns exec $NS_CLIENT ping 10.10.0.100"
    fi
}

main "$@"
