#!/usr/bin/env bash
# Builds the fabric a topology file describes: one namespace per client and host, the
# vfabric switch joining the clients' eth0 and the hosts' vmnic0 through TAP ports, the
# vMotion network joining the hosts' vmk1 (a second switch, "vmotion", or a veth pair
# between two hosts), a hypervisor daemon in each host namespace and the VMs the file
# creates at start. With no FILE: the built-in default, netns-scripts/topologies/
# default.toml (client, silo104, silo105, a veth vMotion link). Settings: see lib.sh.
# Undo with down.sh.
#
# With [[machine]] tables (netns-scripts/topologies/two-machines.toml): two simulated
# machines, each with its own namespace holding its end of a veth underlay (10.30.0.0/24,
# MTU 1600), its own switches joined to the other machine's over VXLAN (VM network VNI
# 42 on UDP 4789, vMotion network VNI 43 on UDP 8472), and its own run directory: the
# first machine's is $VFABRIC_RUN_DIR, where the CLI runs; another's is
# $VFABRIC_RUN_DIR/machine-NAME. The other machines' hosts serve their control API over
# TCP and TLS on their machine's underlay address, listed in $VFABRIC_RUN_DIR/remotes;
# run the CLI in the first machine's namespace (ip netns exec $VF_PREFIX-a vfabric …)
# to reach them, as a shell on that machine would.
#
# Usage: up.sh [--no-hosts] [FILE]
#            --no-hosts, or VF_HOSTS=0: the switches and namespaces only (no daemons, no VMs)
#        up.sh --restart-switch [NAME]
#            Stops the running switch NAME (switch, the default, or vmotion) if any and
#            starts it again with the same ports, then re-applies the addresses and links
#            in the namespaces. Host daemons and their VMs keep running; they re-bind to
#            the new interfaces.
#        up.sh --restart-host NAME
#            Stops host NAME's daemon if it still runs and starts a new one, as up.sh did.
#
# The plan comes from `vfabric topology render FILE --format shell` (the binary parses
# and validates the file; a bad file is one line on stderr and nothing is built) and is
# kept in $VFABRIC_RUN_DIR/topology.sh, which the restarts read and down.sh removes.
set -Eeuo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Sets the VF_TOPO_* arrays from the plan text in $1 and the namespace names from them.
use_plan() {
    # shellcheck disable=SC1090 # the plan: single-quoted bash assignments
    . /dev/stdin <<<"$1"
    ALL_NS=()
    local n
    for n in "${VF_TOPO_MACHINES[@]}" "${VF_TOPO_CLIENTS[@]}" "${VF_TOPO_HOSTS[@]}"; do
        ALL_NS+=("$VF_PREFIX-$n")
    done
    TOP_RUN_DIR=$VFABRIC_RUN_DIR
}

# The machine the commands below act on ("" in a topology of one machine).
MACHINE=

# machine_run_dir NAME — the run directory of machine NAME: the first machine's is
# $VFABRIC_RUN_DIR, another's a directory of its own inside it.
machine_run_dir() {
    if [ "$1" = "${VF_TOPO_MACHINES[0]:-}" ] || [ -z "$1" ]; then
        echo "$TOP_RUN_DIR"
    else
        echo "$TOP_RUN_DIR/machine-$1"
    fi
}

# on_machine NAME CMD… — runs CMD as on machine NAME: its run directory, its switches.
on_machine() {
    local m=$1
    shift
    MACHINE=$m
    VFABRIC_RUN_DIR=$(machine_run_dir "$m")
    [ -d "$VFABRIC_RUN_DIR" ] || mkdir -p -m 0700 "$VFABRIC_RUN_DIR"
    "$@"
    VFABRIC_RUN_DIR=$TOP_RUN_DIR
    MACHINE=
}

# The machines, or one unnamed machine.
machines() {
    if [ ${#VF_TOPO_MACHINES[@]} -eq 0 ]; then echo ""; else printf '%s\n' "${VF_TOPO_MACHINES[@]}"; fi
}

# machine_index NAME — its index in the plan.
machine_index() {
    local i
    for i in "${!VF_TOPO_MACHINES[@]}"; do
        [ "${VF_TOPO_MACHINES[$i]}" = "$1" ] && { echo "$i"; return 0; }
    done
    die "unknown machine $1"
}

# The CLI as a user on the first machine runs it: in its namespace when there are
# machines (the other machines' daemons are reached over its underlay).
cli() {
    if [ ${#VF_TOPO_MACHINES[@]} -gt 0 ]; then
        ip netns exec "$VF_PREFIX-${VF_TOPO_MACHINES[0]}" "$VFABRIC_BIN" "$@"
    else
        "$VFABRIC_BIN" "$@"
    fi
}

# The network between the machines: a veth pair between their namespaces, MTU room for
# VXLAN's 50 bytes over full-size frames.
create_underlay() {
    local a=$VF_PREFIX-${VF_TOPO_MACHINES[0]} b=$VF_PREFIX-${VF_TOPO_MACHINES[1]} i ns
    ip link add ul0 netns "$a" mtu "$VF_TOPO_UNDERLAY_MTU" type veth \
        peer name ul0 netns "$b" mtu "$VF_TOPO_UNDERLAY_MTU"
    for i in 0 1; do
        ns=$VF_PREFIX-${VF_TOPO_MACHINES[$i]}
        ip -n "$ns" addr add "${VF_TOPO_MACHINE_IPS[$i]}" dev ul0
        ip -n "$ns" link set ul0 up
    done
}

# on_this_machine KIND INDEX — true if client/host INDEX is on $MACHINE.
on_this_machine() {
    [ -z "$MACHINE" ] && return 0
    if [ "$1" = client ]; then
        [ "${VF_TOPO_CLIENT_MACHINES[$2]}" = "$MACHINE" ]
    else
        [ "${VF_TOPO_HOST_MACHINES[$2]}" = "$MACHINE" ]
    fi
}

# tunnel_port SWITCH — the VXLAN port of $MACHINE's switch SWITCH to the other machine.
tunnel_port() {
    local i o ns ip peer vni port=
    [ -n "$MACHINE" ] || return 0
    i=$(machine_index "$MACHINE")
    o=$((1 - i))
    ns=$VF_PREFIX-$MACHINE
    ip=${VF_TOPO_MACHINE_IPS[$i]%/*}
    peer=${VF_TOPO_MACHINE_IPS[$o]%/*}
    if [ "$1" = "$VMOTION_SWITCH" ]; then
        vni=$VF_TOPO_VMOTION_VNI
        port=:$VF_TOPO_VMOTION_TUNNEL_PORT
    else
        vni=$VF_TOPO_VM_VNI
    fi
    echo "--port=tunnel=vxlan:vni=$vni,local=$ns:$ip$port,remote=$peer$port"
}

# The plan of the fabric that is up (restarts).
load_recorded_plan() {
    local f="$VFABRIC_RUN_DIR/topology.sh"
    [ -f "$f" ] || die "no $f: the fabric ($VF_PREFIX) is not up, or was not built by this up.sh"
    use_plan "$(cat "$f")"
}

check_not_up() {
    local ns
    for ns in "${ALL_NS[@]}"; do
        ns_exists "$ns" && die "namespace $ns exists already; run down.sh first"
    done
    local sock
    for sock in switch "$VMOTION_SWITCH"; do
        if [ -S "$VFABRIC_RUN_DIR/$sock.sock" ]; then
            die "$VFABRIC_RUN_DIR/$sock.sock exists; run down.sh first"
        fi
    done
    return 0
}

create_namespaces() {
    local ns
    for ns in "${ALL_NS[@]}"; do
        ip netns add "$ns"
        ip -n "$ns" link set lo up
    done
}

# A veth pair between two hosts is created directly inside their namespaces, so its
# ends never exist in the root namespace and parallel topologies cannot collide on names.
create_vmotion_veth() {
    ip link add vmk1 netns "$VF_PREFIX-${VF_TOPO_HOSTS[0]}" type veth \
        peer name vmk1 netns "$VF_PREFIX-${VF_TOPO_HOSTS[1]}"
}

# switch_ports NAME — the --port arguments of switch NAME, one per line.
switch_ports() {
    local n i
    if [ "$1" = "$VMOTION_SWITCH" ]; then
        for i in "${!VF_TOPO_HOSTS[@]}"; do
            n=${VF_TOPO_HOSTS[$i]}
            on_this_machine host "$i" && echo "--port=$n=$VF_PREFIX-$n:vmk1"
        done
        tunnel_port "$1"
        return 0
    fi
    for i in "${!VF_TOPO_CLIENTS[@]}"; do
        n=${VF_TOPO_CLIENTS[$i]}
        on_this_machine client "$i" && echo "--port=$n=$VF_PREFIX-$n:eth0"
    done
    for i in "${!VF_TOPO_HOSTS[@]}"; do
        n=${VF_TOPO_HOSTS[$i]}
        on_this_machine host "$i" && echo "--port=$n=$VF_PREFIX-$n:vmnic0"
    done
    tunnel_port "$1"
}

# start_switch NAME [append] — starts switch NAME with its ports. The VM network's
# switch takes VF_MIRROR and VF_SWITCH_ARGS, the vMotion switch VF_VMOTION_SWITCH_ARGS;
# they are kept in NAME.env so that --restart-switch uses the same ones.
start_switch() {
    local name=$1 pid ports=() extra mirror=()
    mapfile -t ports < <(switch_ports "$name")
    # Born 0700 if we make it; an existing directory keeps its mode (it is not ours).
    [ -d "$VFABRIC_RUN_DIR" ] || mkdir -p -m 0700 "$VFABRIC_RUN_DIR"
    if [ "$name" = switch ]; then
        [ -n "${VF_MIRROR:-}" ] && mirror=(--mirror "$VF_MIRROR")
        extra=${VF_SWITCH_ARGS:-}
        printf 'VF_MIRROR=%q\nVF_SWITCH_ARGS=%q\n' "${VF_MIRROR:-}" "${VF_SWITCH_ARGS:-}" \
            >"$VFABRIC_RUN_DIR/switch.env"
    else
        extra=${VF_VMOTION_SWITCH_ARGS:-}
        printf 'VF_VMOTION_SWITCH_ARGS=%q\n' "$extra" >"$VFABRIC_RUN_DIR/$name.env"
    fi
    if [ "${2:-}" = append ]; then exec 3>>"$VFABRIC_RUN_DIR/$name.log"; else exec 3>"$VFABRIC_RUN_DIR/$name.log"; fi
    # shellcheck disable=SC2086 # the extra arguments are a list of words
    setsid nohup "$VFABRIC_BIN" switch --name "$name" "${ports[@]}" "${mirror[@]}" $extra \
        >&3 2>&1 </dev/null &
    pid=$!
    exec 3>&-
    write_pidfile "$name" "$pid"
    wait_for_socket "$VFABRIC_RUN_DIR/$name.sock" "$pid" "$VFABRIC_RUN_DIR/$name.log"
}

# The switch's TAP interfaces: created by the switch, gone when it stops.
configure_uplinks() {
    local i ns
    for i in "${!VF_TOPO_CLIENTS[@]}"; do
        ns=$VF_PREFIX-${VF_TOPO_CLIENTS[$i]}
        ip -n "$ns" addr add "${VF_TOPO_CLIENT_IPS[$i]}" dev eth0
        ip -n "$ns" link set eth0 up
    done
    for i in "${!VF_TOPO_HOSTS[@]}"; do
        ns=$VF_PREFIX-${VF_TOPO_HOSTS[$i]}
        ip -n "$ns" addr add "${VF_TOPO_HOST_IPS[$i]}" dev vmnic0
        ip -n "$ns" link set vmnic0 up
    done
}

# wait_for_links NAME — waits (at most 3 s) until switch NAME has seen the links of the
# interfaces just brought up: it reads each port's link state about once a second, and
# floods skip a port whose link it still takes for down.
wait_for_links() {
    local _ rows
    for _ in $(seq 30); do
        # Whole, not piped into grep -q: a reader that stops early fails the pipeline.
        rows=$("$VFABRIC_BIN" ports --switch "$1" --json 2>/dev/null) || return 0
        case $rows in
            *'"link_up": false'*) sleep 0.1 ;;
            *) return 0 ;;
        esac
    done
    log "switch $1: a port's link is still down after 3 s"
}

configure_vmotion() {
    local i ns
    for i in "${!VF_TOPO_HOSTS[@]}"; do
        ns=$VF_PREFIX-${VF_TOPO_HOSTS[$i]}
        ip -n "$ns" addr add "${VF_TOPO_HOST_VMKS[$i]}" dev vmk1
        ip -n "$ns" link set vmk1 up
    done
}

# switch_ifaces_gone NAME — true once none of switch NAME's interfaces exists.
switch_ifaces_gone() {
    local p spec ns ifname
    while read -r p; do
        case "$p" in --port=*=vxlan:*) continue ;; esac
        spec=${p#--port=*=}
        ns=${spec%%:*} ifname=${spec#*:}
        ip -n "$ns" link show "$ifname" >/dev/null 2>&1 && return 1
    done < <(switch_ports "$1")
    return 0
}

# The switch's interfaces vanish as its TAP fds close; a new switch cannot name its
# own the same until they have.
wait_for_switch_gone() {
    local i
    for i in $(seq 100); do
        switch_ifaces_gone "$1" && return 0
        sleep 0.1
    done
    die "the old $1 switch's interfaces did not go away"
}

# Brings switch NAME back with the same ports, whether it still runs or died. The host
# daemons notice their uplink return and re-bind their VMs' NICs by themselves.
restart_switch() {
    local name=$1 ns
    load_recorded_plan
    [ ${#VF_TOPO_MACHINES[@]} -eq 0 ] \
        || die "--restart-switch is for a topology of one machine (this one has ${VF_TOPO_MACHINES[*]})"
    case "$name" in
        switch) ;;
        "$VMOTION_SWITCH")
            [ "$VF_TOPO_VMOTION" = switch ] \
                || die "this fabric's vMotion network is a veth pair, not a switch"
            ;;
        *) die "unknown switch $name (switch or $VMOTION_SWITCH)" ;;
    esac
    for ns in "${ALL_NS[@]}"; do
        ns_exists "$ns" || die "namespace $ns does not exist; run up.sh first"
    done
    if [ -e "$VFABRIC_RUN_DIR/$name.pid" ]; then kill_pidfile "$VFABRIC_RUN_DIR/$name.pid"; fi
    wait_for_switch_gone "$name"
    # The old switch is gone: a socket file left by a crash is stale.
    rm -f "$VFABRIC_RUN_DIR/$name.sock"
    # The options up.sh used, unless given again.
    if [ "$name" = switch ]; then
        if [ -z "${VF_MIRROR+x}${VF_SWITCH_ARGS+x}" ] && [ -f "$VFABRIC_RUN_DIR/switch.env" ]; then
            # shellcheck disable=SC1091
            . "$VFABRIC_RUN_DIR/switch.env"
        fi
        start_switch switch append
        configure_uplinks
        wait_for_links switch
    else
        if [ -z "${VF_VMOTION_SWITCH_ARGS+x}" ] && [ -f "$VFABRIC_RUN_DIR/$name.env" ]; then
            # shellcheck disable=SC1090
            . "$VFABRIC_RUN_DIR/$name.env"
        fi
        start_switch "$name" append
        configure_vmotion
    fi
    log "$name restarted; log in $VFABRIC_RUN_DIR/$name.log"
}

# host_index NAME — the host's index in the plan.
host_index() {
    local i
    for i in "${!VF_TOPO_HOSTS[@]}"; do
        [ "${VF_TOPO_HOSTS[$i]}" = "$1" ] && { echo "$i"; return 0; }
    done
    die "unknown host $1 (the fabric's hosts: ${VF_TOPO_HOSTS[*]})"
}

# launch_host INDEX — starts one hypervisor daemon in its namespace: vMotion listener on
# vmk1, VM NICs on vmnic0, a datastore directory every host sees. Sets LAUNCHED_PID.
launch_host() {
    local i=$1 host ns vmk m mi remote=()
    host=${VF_TOPO_HOSTS[$i]}
    ns=$VF_PREFIX-$host
    vmk=${VF_TOPO_HOST_VMKS[$i]%/*}
    local -n host_args="VF_TOPO_HOST_ARGS_$i"
    # A host on another machine than the CLI's: its own certificates there, and its
    # control API over TCP and TLS on that machine's underlay address.
    m=${VF_TOPO_HOST_MACHINES[$i]:-}
    if [ -n "$m" ] && [ "$m" != "${VF_TOPO_MACHINES[0]}" ]; then
        mi=$(machine_index "$m")
        remote=(--pki-dir "$VFABRIC_RUN_DIR/pki" --control-listen
            "$VF_PREFIX-$m:${VF_TOPO_MACHINE_IPS[$mi]%/*}:$((VF_TOPO_CONTROL_PORT_BASE + i))")
    fi
    mkdir -p "$VF_DATASTORE"
    # A daemon killed outright leaves its socket behind; the new one must not be
    # mistaken for ready because of it. Its log is appended to, not replaced.
    rm -f "$VFABRIC_RUN_DIR/$host.sock"
    # shellcheck disable=SC2086 # VF_HOST_ARGS is a list of words
    setsid nohup ip netns exec "$ns" "$VFABRIC_BIN" host --name "$host" \
        --vmotion-addr "$vmk:8000" --uplink vmnic0 \
        --capacity-mb "${VF_TOPO_HOST_CAPACITY[$i]}" --datastore "$VF_DATASTORE" \
        "${remote[@]}" "${host_args[@]}" ${VF_HOST_ARGS:-} \
        >>"$VFABRIC_RUN_DIR/$host.log" 2>&1 </dev/null &
    LAUNCHED_PID=$!
    write_pidfile "$host" "$LAUNCHED_PID"
}

# The daemons start side by side; then each is waited for.
start_hosts() {
    local i host pids=() dir m
    # The fabric CA and one certificate per host, for authenticated, encrypted vMotion
    # ($VFABRIC_RUN_DIR/pki, 0700; files 0600). An existing CA is kept.
    "$VFABRIC_BIN" pki init >/dev/null
    "$VFABRIC_BIN" pki issue "${VF_TOPO_HOSTS[@]}" >/dev/null
    if [ ${#VF_TOPO_MACHINES[@]} -gt 0 ]; then
        # The CLI's operator certificate stays on the first machine with the CA; the
        # other machines get the CA certificate and their hosts' certificates, as an
        # administrator would copy them over.
        "$VFABRIC_BIN" pki issue-operator >/dev/null
        : >"$VFABRIC_RUN_DIR/remotes"
        for i in "${!VF_TOPO_HOSTS[@]}"; do
            m=${VF_TOPO_HOST_MACHINES[$i]}
            [ "$m" = "${VF_TOPO_MACHINES[0]}" ] && continue
            host=${VF_TOPO_HOSTS[$i]}
            dir=$(machine_run_dir "$m")/pki
            mkdir -p -m 0700 "$dir"
            cp -p "$VFABRIC_RUN_DIR/pki/ca.pem" "$VFABRIC_RUN_DIR/pki/$host.pem" \
                "$VFABRIC_RUN_DIR/pki/$host.key" "$dir/"
            echo "$host=${VF_TOPO_MACHINE_IPS[$(machine_index "$m")]%/*}:$((VF_TOPO_CONTROL_PORT_BASE + i))" \
                >>"$VFABRIC_RUN_DIR/remotes"
        done
    fi
    for i in "${!VF_TOPO_HOSTS[@]}"; do
        on_machine "${VF_TOPO_HOST_MACHINES[$i]:-}" start_host_here "$i"
        pids+=("$LAUNCHED_PID")
    done
    for i in "${!VF_TOPO_HOSTS[@]}"; do
        host=${VF_TOPO_HOSTS[$i]}
        dir=$(machine_run_dir "${VF_TOPO_HOST_MACHINES[$i]:-}")
        wait_for_socket "$dir/$host.sock" "${pids[$i]}" "$dir/$host.log"
    done
}

start_host_here() {
    : >"$VFABRIC_RUN_DIR/${VF_TOPO_HOSTS[$1]}.log"
    launch_host "$1"
}

# The VMs the file creates at start, through the hosts' control API as a user would.
create_vms() {
    local i
    for i in "${!VF_TOPO_VMS[@]}"; do
        cli vm create "${VF_TOPO_VMS[$i]}" --host "${VF_TOPO_VM_HOSTS[$i]}" \
            --ip "${VF_TOPO_VM_IPS[$i]}" --memory-mb "${VF_TOPO_VM_MEMORY[$i]}" \
            --vcpus "${VF_TOPO_VM_VCPUS[$i]}" --word-bits "${VF_TOPO_VM_WORD_BITS[$i]}" \
            --workload "${VF_TOPO_VM_WORKLOADS[$i]}" \
            --dirty-rate "${VF_TOPO_VM_RATES[$i]}" >/dev/null
    done
}

# Replaces one host's daemon (a crashed one, or one to restart): the fabric must be up.
restart_host() {
    local host=$1 i
    load_recorded_plan
    [ ${#VF_TOPO_MACHINES[@]} -eq 0 ] \
        || die "--restart-host is for a topology of one machine (this one has ${VF_TOPO_MACHINES[*]})"
    i=$(host_index "$host")
    ns_exists "$VF_PREFIX-$host" || die "the fabric ($VF_PREFIX) is not up"
    [ -f "$VFABRIC_RUN_DIR/$host.pid" ] && kill_pidfile "$VFABRIC_RUN_DIR/$host.pid"
    launch_host "$i"
    wait_for_socket "$VFABRIC_RUN_DIR/$host.sock" "$LAUNCHED_PID" "$VFABRIC_RUN_DIR/$host.log"
    log "restarted $host; log in $VFABRIC_RUN_DIR/$host.log"
}

on_error() {
    log "failed; removing what was created"
    "$(dirname "${BASH_SOURCE[0]}")/down.sh" || true
}

main() {
    local hosts=${VF_HOSTS:-1} file= plan
    while [ $# -gt 0 ]; do
        case "$1" in
            --no-hosts) hosts=0 ;;
            --restart-switch)
                need_root
                ensure_bin
                restart_switch "${2:-switch}"
                exit 0
                ;;
            --restart-host)
                [ -n "${2:-}" ] || die "--restart-host needs a host name"
                need_root
                ensure_bin
                restart_host "$2"
                exit 0
                ;;
            -h|--help) sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
            -*) die "unknown option $1 (try --help)" ;;
            *)
                [ -z "$file" ] || die "one topology file only (got $file and $1)"
                file=$1
                ;;
        esac
        shift
    done
    ensure_bin
    # The binary validates the file; on a bad one it has said why, on one line.
    plan=$("$VFABRIC_BIN" topology render ${file:+"$file"} --format shell \
        --default-capacity-mb "$VF_HOST_CAPACITY_MB") || exit 1
    need_root
    ensure_packages ip:iproute2 ping:iputils-ping tcpdump:tcpdump
    use_plan "$plan"
    check_not_up
    # From here on, any failure (a failed command or `die`) removes what was created.
    trap 'rc=$?; [ "$rc" -eq 0 ] || on_error' EXIT
    [ -d "$VFABRIC_RUN_DIR" ] || mkdir -p -m 0700 "$VFABRIC_RUN_DIR"
    printf '%s\n' "$plan" >"$VFABRIC_RUN_DIR/topology.sh"
    create_namespaces
    local m
    if [ ${#VF_TOPO_MACHINES[@]} -gt 0 ]; then
        create_underlay
    fi
    if [ "$VF_TOPO_VMOTION" = veth ]; then
        create_vmotion_veth
    else
        while read -r m; do on_machine "$m" start_switch "$VMOTION_SWITCH"; done < <(machines)
    fi
    while read -r m; do on_machine "$m" start_switch switch; done < <(machines)
    configure_uplinks
    wait_for_links switch
    configure_vmotion
    if [ "$hosts" = 1 ]; then
        start_hosts
        create_vms
    fi
    trap - EXIT
    log "up: namespaces ${ALL_NS[*]}; logs in $VFABRIC_RUN_DIR"
    # The CLI finds this fabric through the same variables: say so when they differ
    # from the defaults, so that every hint works when pasted as it is.
    local env= h0=${VF_TOPO_HOSTS[0]} c0=${VF_TOPO_CLIENTS[0]:-}
    [ "$VF_PREFIX" = vf ] || env+="VF_PREFIX=$VF_PREFIX "
    [ "$VFABRIC_RUN_DIR" = /run/vfabric ] || env+="VFABRIC_RUN_DIR=$VFABRIC_RUN_DIR "
    if [ ${#VF_TOPO_MACHINES[@]} -gt 0 ]; then
        log "machines ${VF_TOPO_MACHINES[*]}: the CLI runs on ${VF_TOPO_MACHINES[0]}; try: ${env}ip netns exec $VF_PREFIX-${VF_TOPO_MACHINES[0]} $VFABRIC_BIN hosts"
        [ ${#VF_TOPO_VMS[@]} -gt 0 ] && [ "$hosts" = 1 ] && \
            log "     ${env}ip netns exec $VF_PREFIX-${VF_TOPO_MACHINES[0]} $VFABRIC_BIN migrate ${VF_TOPO_VMS[0]} --to ${VF_TOPO_HOSTS[-1]}"
        return 0
    fi
    [ -n "$c0" ] || return 0
    log "try: ip netns exec $VF_PREFIX-$c0 ping ${VF_TOPO_HOST_IPS[0]%/*}; ${env}$VFABRIC_BIN fdb show"
    if [ "$hosts" = 1 ] && [ ${#VF_TOPO_VMS[@]} -gt 0 ]; then
        log "     ${env}$VFABRIC_BIN vm list; ip netns exec $VF_PREFIX-$c0 ping ${VF_TOPO_VM_IPS[0]}"
    elif [ "$hosts" = 1 ]; then
        log "     ${env}$VFABRIC_BIN vm create vm1 --host $h0 --ip 10.10.0.100; ip netns exec $VF_PREFIX-$c0 ping 10.10.0.100"
    fi
}

main "$@"
