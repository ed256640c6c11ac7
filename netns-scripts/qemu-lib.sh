# Helpers for putting real QEMU guests on vfabric (sourced after lib.sh): the packages,
# a tiny guest built from Debian packages only, QEMU started on a vfabric QEMU socket
# port, and QMP from the shell.
#
# The guest: the kernel of Debian's linux-image-amd64 (fetched with apt-get download,
# unpacked with dpkg -x; nothing is installed into /boot) and an initramfs of
# busybox-static whose init loads the virtio NIC's modules, gives eth0 an address and
# rewrites some memory for as long as it runs, so a live migration has dirty pages to
# chase. It is cached in VF_GUEST_CACHE (default /var/cache/vfabric/guest).

VF_GUEST_CACHE=${VF_GUEST_CACHE:-/var/cache/vfabric/guest}

ensure_qemu_packages() {
    ensure_packages qemu-system-x86_64:qemu-system-x86 busybox:busybox-static \
        socat:socat jq:jq dpkg-deb:dpkg
}

# The virtio NIC's modules, in load order (Debian builds them as modules).
GUEST_MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover virtio_net"

# build_guest — sets GUEST_KERNEL and GUEST_INITRD (built once, then cached).
# GUEST_IP (default 10.10.0.100/24) and GUEST_DIRTY_MB (default 8) go into the init.
build_guest() {
    local ip=${GUEST_IP:-10.10.0.100/24} dirty=${GUEST_DIRTY_MB:-8}
    local key="${ip//\//_}-$dirty-2"
    GUEST_KERNEL="$VF_GUEST_CACHE/vmlinuz"
    GUEST_INITRD="$VF_GUEST_CACHE/initrd-$key.gz"
    [ -s "$GUEST_KERNEL" ] && [ -s "$GUEST_INITRD" ] && return 0
    mkdir -p "$VF_GUEST_CACHE"
    local work pkg m f
    work=$(mktemp -d "$VF_GUEST_CACHE/build.XXXXXX")
    # The kernel and its NIC modules are fetched once; each initramfs is built from them.
    if [ ! -s "$GUEST_KERNEL" ] || [ ! -d "$VF_GUEST_CACHE/modules" ]; then
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
        [ -n "$pkg" ] || die "no linux-image-amd64 in the package lists (apt-get update?)"
        log "fetching $pkg (Debian's kernel; unpacked, not installed)"
        (cd "$work" && apt-get download "$pkg" >/dev/null 2>&1) \
            || { DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null; (cd "$work" && apt-get download "$pkg" >/dev/null 2>&1); } \
            || die "apt-get download $pkg failed"
        dpkg -x "$work"/"$pkg"_*.deb "$work/k"
        rm -rf "$VF_GUEST_CACHE/modules" && mkdir -p "$VF_GUEST_CACHE/modules.new"
        for m in $GUEST_MODULES; do
            f=$(find "$work/k/lib/modules" -name "$m.ko" | head -1)
            [ -n "$f" ] || die "module $m.ko not in $pkg"
            cp "$f" "$VF_GUEST_CACHE/modules.new/"
        done
        mv "$VF_GUEST_CACHE/modules.new" "$VF_GUEST_CACHE/modules"
        cp "$work"/k/boot/vmlinuz-* "$GUEST_KERNEL.tmp" && mv "$GUEST_KERNEL.tmp" "$GUEST_KERNEL"
        rm -rf "$work/k" "$work"/*.deb
    fi
    mkdir -p "$work/root"/{bin,sbin,proc,sys,dev,dev/shm,tmp,lib/modules}
    cp "$(command -v busybox)" "$work/root/bin/busybox"
    cp "$VF_GUEST_CACHE"/modules/*.ko "$work/root/lib/modules/"
    cat >"$work/root/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/shm && mount -t tmpfs -o size=64m shm /dev/shm
for m in $GUEST_MODULES; do insmod /lib/modules/\$m.ko 2>/dev/null; done
ip link set lo up
ip addr add $ip dev eth0
ip link set eth0 up
echo "vfabric-guest: eth0 up as $ip" >/dev/console
# Rewrite $dirty MiB of memory over and over: pages a live migration must send again.
[ $dirty -gt 0 ] && (while :; do dd if=/dev/zero of=/dev/shm/dirty bs=1M count=$dirty conv=notrunc 2>/dev/null; usleep 20000; done) &
exec sh -c 'while :; do sleep 3600; done'
EOF
    chmod 755 "$work/root/init"
    (cd "$work/root" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) >"$work/initrd.gz"
    mv "$work/initrd.gz" "$GUEST_INITRD"
    rm -rf "$work"
}

# QEMU_ACCEL: kvm or tcg; qemu_boot picks one when unset.
QEMU_ACCEL=${QEMU_ACCEL:-}

# qemu_start NAME STREAM_SOCKET MAC DIR [extra QEMU args...] — starts a QEMU booting
# the guest, its NIC on vfabric port socket STREAM_SOCKET; QMP at DIR/NAME.qmp, serial
# console in DIR/NAME.console. Prints the pid.
qemu_start() {
    local name=$1 sock=$2 mac=$3 dir=$4
    shift 4
    qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot \
        -accel "${QEMU_ACCEL:-tcg}" -m 128 -smp 1 \
        -kernel "$GUEST_KERNEL" -initrd "$GUEST_INITRD" \
        -append "console=ttyS0 panic=-1" \
        -netdev "stream,id=n0,server=off,addr.type=unix,addr.path=$sock" \
        -device "virtio-net-pci,netdev=n0,mac=$mac,romfile=" \
        -qmp "unix:$dir/$name.qmp,server=on,wait=off" \
        -serial "file:$dir/$name.console" \
        "$@" >"$dir/$name.log" 2>&1 &
    echo $!
}

# qemu_boot NAME STREAM_SOCKET MAC DIR — qemu_start, then waits for the guest's eth0.
# Without QEMU_ACCEL it tries KVM first (when /dev/kvm is there) and falls back to TCG
# if the kernel prints nothing within 10 s (a nested KVM that cannot run a guest).
# Sets QEMU_PID and QEMU_ACCEL; BOOT_S is how long the boot took.
qemu_boot() {
    local name=$1 sock=$2 mac=$3 dir=$4 tries accel t0 i
    if [ -n "$QEMU_ACCEL" ]; then tries=$QEMU_ACCEL
    elif [ -r /dev/kvm ] && [ -w /dev/kvm ]; then tries="kvm tcg"
    else tries=tcg; fi
    for accel in $tries; do
        QEMU_ACCEL=$accel
        t0=$(date +%s%N)
        : >"$dir/$name.console"
        QEMU_PID=$(qemu_start "$name" "$sock" "$mac" "$dir")
        # A KVM guest prints within a second or two; TCG (the last resort) may take 15.
        if [ "$accel" = kvm ]; then
            for i in $(seq 100); do
                grep -q "Linux version" "$dir/$name.console" 2>/dev/null && break
                kill -0 "$QEMU_PID" 2>/dev/null || break
                sleep 0.1
            done
        fi
        if [ "$accel" != kvm ] || grep -q "Linux version" "$dir/$name.console" 2>/dev/null; then
            for i in $(seq 1200); do
                grep -q "vfabric-guest: eth0 up" "$dir/$name.console" 2>/dev/null && break
                kill -0 "$QEMU_PID" 2>/dev/null || die "QEMU exited (log: $dir/$name.log)"
                sleep 0.1
            done
            grep -q "vfabric-guest: eth0 up" "$dir/$name.console" \
                || die "the guest did not bring eth0 up in 120 s (console: $dir/$name.console)"
            BOOT_S=$(( ($(date +%s%N) - t0) / 1000000 ))
            BOOT_S="$((BOOT_S / 1000)).$(printf %03d $((BOOT_S % 1000)))"
            return 0
        fi
        kill "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
        log "$accel did not start the guest kernel within 10 s; trying the next accelerator"
    done
    die "QEMU could not boot the guest (log: $dir/$name.log)"
}

# qmp SOCKET COMMAND [ARGUMENTS-JSON] — runs one QMP command, prints its reply (JSON).
qmp() {
    local sock=$1 cmd=$2 args=${3:-"{}"}
    printf '{"execute":"qmp_capabilities"}\n{"execute":"%s","arguments":%s}\n' "$cmd" "$args" \
        | socat -t 0.3 - "UNIX-CONNECT:$sock" 2>/dev/null \
        | jq -c 'select(has("return") or has("error"))' | tail -n 1
}

# qmp_wait SOCKET — waits until QEMU answers on its QMP socket.
qmp_wait() {
    local i
    for i in $(seq 200); do
        [ -S "$1" ] && qmp "$1" query-status | grep -q return && return 0
        sleep 0.05
    done
    return 1
}
