# shellcheck shell=bash
# Shared helpers for the VM tests in scripts/vm/: build a minimal Debian (bookworm) image from
# Debian packages only, serve a data disk through nbdkit, boot it in qemu, kill it like a power
# cut. Sourced by the test scripts, which set `set -euo pipefail` and call vm_cleanup in their
# EXIT trap.
#
# The image lives in $VM_CACHE (never in the repository):
#   rootfs/          debootstrap tree (minbase + kernel + systemd), built once
#   rootfs.ext4      that tree as an ext4 image, attached read-only (snapshot=on) as /dev/vda
#   vmlinuz, initrd  the kernel and initramfs of the tree, booted with -kernel/-initrd
# The tree carries /sbin/ferry-vm-init: a tiny PID 1 that mounts /dev/vdb on /data, runs
# /data/guest.sh (environment: the kernel command line's unknown `name=value` words), and
# powers off. Booting without init= gives systemd as PID 1 for tests that need it.
# no_timer_check: without KVM on a loaded host the kernel may find the timer "not working" and
# panic at boot.

VM_SUITE=bookworm
VM_MIRROR=${VM_MIRROR:-http://deb.debian.org/debian}
VM_PACKAGES=linux-image-amd64,systemd-sysv,udev,kmod,e2fsprogs,util-linux,procps,socat
VM_MEM_MB=${VM_MEM_MB:-1536}
# PID 1 of the guest; empty boots the image's systemd.
VM_INIT=${VM_INIT-/sbin/ferry-vm-init}
VM_PIDS=()
# More qemu arguments for vm_start_qemu (e.g. a second serial port); set after sourcing.
VM_QEMU_EXTRA=()

vm_log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
vm_die() {
    vm_log "error: $*"
    exit 2
}

# The PID 1 of the test boots. Kept here so that changing it rebuilds rootfs.ext4.
vm_init_script() {
    cat <<'EOF'
#!/bin/sh
# ferry VM test init: mount what a test needs, run /data/guest.sh, power off.
mount -t proc proc /proc
mount -t sysfs sys /sys 2>/dev/null
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
echo "VM-INIT-UP"
if mount -t ext4 /dev/vdb /data; then
    if [ -x /data/guest.sh ]; then
        /data/guest.sh
        echo "GUEST-EXIT rc=$?"
    else
        echo "VM-INIT no /data/guest.sh"
    fi
    umount /data || echo "VM-INIT umount /data failed"
else
    echo "VM-INIT cannot mount /dev/vdb"
fi
sync
echo "VM-POWEROFF"
echo o > /proc/sysrq-trigger
sleep 60
EOF
}

# Builds (once) the rootfs, its ext4 image, kernel and initrd under $VM_CACHE.
vm_build_image() {
    : "${VM_CACHE:?VM_CACHE must be set}"
    mkdir -p "$VM_CACHE"
    # Several test runs may share the cache: one builds, the others wait.
    exec 8>"$VM_CACHE/build.lock"
    flock 8
    if [[ ! -d $VM_CACHE/rootfs ]]; then
        vm_log "debootstrap $VM_SUITE (minbase + $VM_PACKAGES) into $VM_CACHE/rootfs.tmp"
        rm -rf "$VM_CACHE/rootfs.tmp"
        debootstrap --variant=minbase --include="$VM_PACKAGES" "$VM_SUITE" \
            "$VM_CACHE/rootfs.tmp" "$VM_MIRROR" >"$VM_CACHE/debootstrap.log" 2>&1 ||
            vm_die "debootstrap failed, see $VM_CACHE/debootstrap.log"
        mv "$VM_CACHE/rootfs.tmp" "$VM_CACHE/rootfs"
    fi
    local root=$VM_CACHE/rootfs init
    if [[ ! -x $root/usr/bin/socat ]]; then
        # A tree from before socat was in VM_PACKAGES.
        vm_log "installing socat into $root"
        { chroot "$root" apt-get update -q && chroot "$root" apt-get install -y --no-install-recommends socat; } \
            >>"$VM_CACHE/debootstrap.log" 2>&1 || vm_die "cannot install socat, see $VM_CACHE/debootstrap.log"
    fi
    init=$(vm_init_script)
    if [[ ! -f $root/sbin/ferry-vm-init ]] || [[ $(cat "$root/sbin/ferry-vm-init") != "$init" ]]; then
        printf '%s\n' "$init" >"$root/sbin/ferry-vm-init"
        chmod 755 "$root/sbin/ferry-vm-init"
        mkdir -p "$root/data"
        rm -f "$VM_CACHE/rootfs.ext4"
    fi
    if [[ ! -f $VM_CACHE/rootfs.ext4 || $root/var/lib/dpkg/status -nt $VM_CACHE/rootfs.ext4 ]]; then
        vm_log "building $VM_CACHE/rootfs.ext4"
        mkfs.ext4 -q -F -L ferryroot -d "$root" "$VM_CACHE/rootfs.ext4.tmp" 2G
        mv "$VM_CACHE/rootfs.ext4.tmp" "$VM_CACHE/rootfs.ext4"
    fi
    local k i
    k=$(find "$root/boot" -maxdepth 1 -name 'vmlinuz-*' | sort | tail -n1)
    i=$(find "$root/boot" -maxdepth 1 -name 'initrd.img-*' | sort | tail -n1)
    [[ -n $k && -n $i ]] || vm_die "no kernel/initrd in $root/boot"
    cp -u "$k" "$VM_CACHE/vmlinuz"
    cp -u "$i" "$VM_CACHE/initrd"
    flock -u 8
    exec 8>&-
}

# vm_make_disk IMG SIZE DIR: a fresh ext4 image holding DIR's files (written by mkfs on the
# host, so everything in it is on "disk" before the VM starts).
vm_make_disk() {
    rm -f "$1"
    mkfs.ext4 -q -F -L ferrydata -E lazy_itable_init=0,lazy_journal_init=0 -d "$3" "$1" "$2"
}

# vm_accel: prints the qemu accelerator options. VM_ACCEL=kvm|tcg forces one; auto (default)
# uses KVM only if a probe boot under KVM reaches the init within 60 s (nested KVM on some
# hosts opens /dev/kvm but hangs right after the kernel decompressor), else TCG. The probe's
# answer is cached in $VM_CACHE/accel for the rest of the run (delete it to probe again).
vm_accel() {
    local a=${VM_ACCEL:-auto}
    if [[ $a == auto ]]; then
        if [[ -s $VM_CACHE/accel ]]; then
            a=$(cat "$VM_CACHE/accel")
        else
            a=tcg
            if [[ -c /dev/kvm ]] && vm_probe_kvm; then a=kvm; fi
            echo "$a" >"$VM_CACHE/accel"
        fi
    fi
    case $a in
    kvm) echo "-accel kvm -cpu host,-arch-capabilities" ;;
    tcg) echo "-accel tcg" ;;
    *) vm_die "VM_ACCEL must be kvm, tcg or auto" ;;
    esac
}

vm_probe_kvm() {
    local log=$VM_CACHE/kvm-probe.log
    rm -f "$log"
    timeout 60 qemu-system-x86_64 -accel kvm -cpu host,-arch-capabilities -m 512 -nodefaults \
        -no-user-config -display none -no-reboot -nic none -serial "file:$log" \
        -kernel "$VM_CACHE/vmlinuz" -initrd "$VM_CACHE/initrd" \
        -append "root=/dev/vda ro console=ttyS0 panic=-1 init=/sbin/ferry-vm-init" \
        -drive "file=$VM_CACHE/rootfs.ext4,if=virtio,format=raw,snapshot=on" \
        </dev/null >/dev/null 2>&1 || true
    grep -aq VM-INIT-UP "$log"
}

# vm_start_nbdkit IMG SOCK CACHE(plain|volatile) LOG: serves IMG on a unix socket. `volatile`
# adds nbdkit's cache filter in writeback mode: writes stay in the filter's cache (a temporary
# file of the nbdkit process) and reach IMG only on an NBD flush, so killing nbdkit drops every
# write the guest did not flush, like a disk's volatile write cache at power loss.
# Sets NBDKIT_PID.
vm_start_nbdkit() {
    local img=$1 sock=$2 cache=$3 log=$4
    rm -f "$sock"
    local filter=()
    [[ $cache == volatile ]] && filter=(--filter=cache)
    mkdir -p "$VM_CACHE/tmp"
    TMPDIR=$VM_CACHE/tmp nbdkit --foreground --exit-with-parent --unix "$sock" "${filter[@]}" \
        file "file=$img" ${filter:+cache=writeback} >"$log" 2>&1 &
    NBDKIT_PID=$!
    VM_PIDS+=("$NBDKIT_PID")
    local n=0
    until [[ -S $sock ]]; do
        ((++n < 100)) || vm_die "nbdkit did not create $sock (see $log)"
        kill -0 "$NBDKIT_PID" 2>/dev/null || vm_die "nbdkit exited (see $log)"
        sleep 0.1
    done
}

# vm_start_qemu SOCK SERIAL_LOG APPEND: boots the image with the data disk from nbdkit's SOCK
# as /dev/vdb (qemu cache=writeback: the guest sees a write cache and must flush it), the
# serial console into SERIAL_LOG, APPEND added to the kernel command line. No network device.
# Sets QEMU_PID.
vm_start_qemu() {
    local sock=$1 serial=$2 append=$3 accel
    accel=$(vm_accel)
    [[ -n $VM_INIT ]] && append="init=$VM_INIT $append"
    # shellcheck disable=SC2086 # accel is a list of options
    qemu-system-x86_64 $accel -m "$VM_MEM_MB" -smp 1 -nodefaults -no-user-config \
        -display none -no-reboot -nic none \
        -chardev "file,id=ser0,path=$serial" -serial chardev:ser0 \
        -kernel "$VM_CACHE/vmlinuz" -initrd "$VM_CACHE/initrd" \
        -append "root=/dev/vda ro console=ttyS0 loglevel=3 panic=-1 no_timer_check $append" \
        -drive "file=$VM_CACHE/rootfs.ext4,if=virtio,format=raw,snapshot=on" \
        -drive "file=nbd+unix:///?socket=$sock,if=virtio,format=raw,cache=writeback" \
        "${VM_QEMU_EXTRA[@]}" </dev/null >"$serial.qemu" 2>&1 &
    QEMU_PID=$!
    VM_PIDS+=("$QEMU_PID")
}

# vm_power_cut: SIGKILL qemu and nbdkit together (the power goes, the disk cache with it).
vm_power_cut() {
    kill -KILL "$QEMU_PID" "$NBDKIT_PID" 2>/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
    wait "$NBDKIT_PID" 2>/dev/null || true
}

# vm_wait_exit TIMEOUT_S: waits for a guest that powers itself off; then stops nbdkit cleanly
# (SIGTERM, after qemu flushed on exit). Returns 1 (after killing both) on timeout.
vm_wait_exit() {
    local deadline=$((SECONDS + $1))
    while kill -0 "$QEMU_PID" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            vm_power_cut
            return 1
        fi
        sleep 0.5
    done
    wait "$QEMU_PID" 2>/dev/null || true
    kill -TERM "$NBDKIT_PID" 2>/dev/null || true
    wait "$NBDKIT_PID" 2>/dev/null || true
}

# vm_wait_serial FILE REGEX TIMEOUT_S: waits until a line of FILE matches REGEX (and qemu runs).
vm_wait_serial() {
    local deadline=$((SECONDS + $3))
    until grep -qE "$2" "$1" 2>/dev/null; do
        ((SECONDS < deadline)) || return 1
        kill -0 "$QEMU_PID" 2>/dev/null || return 1
        sleep 0.1
    done
}

# Kills whatever the helpers started and is still running. For the callers' EXIT trap.
vm_cleanup() {
    local p
    for p in "${VM_PIDS[@]}"; do
        kill -KILL "$p" 2>/dev/null || true
    done
}
