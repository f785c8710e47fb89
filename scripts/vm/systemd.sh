#!/usr/bin/env bash
# The .deb's unit under real systemd (issue "field-ready", item 6). Not part of CI: one boot
# under TCG (no KVM on the CI machines) takes several minutes.
#
# Boots the Debian bookworm image of lib.sh with systemd as PID 1, installs the amd64 .deb and
# checks (systemd-guest.sh): `systemctl start` reaches active only after ferry's READY=1 (the
# journal at debug level orders the notification before the state change); `systemctl reload`
# applies a good config and keeps the agent running on a bad one; a SIGSTOPped ferry is killed
# by the watchdog and restarted; `systemctl stop` is clean and within TimeoutStopSec; the
# service user opens a serial port of group dialout (a second qemu serial port the host feeds
# with lines); `systemd-analyze security` on the running unit. Results: docs/PACKAGING.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=scripts/vm/lib.sh
source "$HERE/lib.sh"

usage() {
    cat <<EOF
usage: $0 [--deb PATH] [--cache DIR] [--out DIR]
  --deb PATH   the amd64 .deb to install (default: built with packaging/build-deb.sh amd64)
  --cache DIR  image cache (default: \${XDG_CACHE_HOME:-\$HOME/.cache}/ferry-vm-systemd); an
               image of its own, because this test adds packages the power-cut image lacks
  --out DIR    results directory (default: DIR/systemd-<date>)
Prints the checks and exits 1 if any failed.
EOF
}

DEB= OUT=
VM_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/ferry-vm-systemd
while (($#)); do
    case $1 in
    --deb) DEB=$2; shift 2 ;;
    --cache) VM_CACHE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
    esac
done
for t in qemu-system-x86_64 nbdkit debootstrap mkfs.ext4 socat; do
    command -v "$t" >/dev/null || vm_die "$t is not installed"
done
((EUID == 0)) || vm_die "run as root (debootstrap, chroot)"
if [[ -z $DEB ]]; then
    DEB=$("$ROOT/packaging/build-deb.sh" amd64 | tail -n1)
fi
[[ -f $DEB ]] || vm_die "no .deb at $DEB"
OUT=${OUT:-$VM_CACHE/systemd-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" "$VM_CACHE"
WORK=$(mktemp -d "$VM_CACHE/systemd-work.XXXXXX")
FEEDER=
cleanup() {
    vm_cleanup
    [[ -z $FEEDER ]] || kill "$FEEDER" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The runner systemd starts from the kernel command line: mount the data disk, run the test.
RUNNER=/usr/local/sbin/ferry-vm-systemd-test
runner_script() {
    cat <<'EOF'
#!/bin/sh
mkdir -p /data
mount -t ext4 /dev/vdb /data || { echo "RUNNER cannot mount /dev/vdb" >/dev/console; exit 1; }
exec /data/guest.sh
EOF
}

# The image: lib.sh's, plus what the .deb depends on (the VM has no network) and the runner.
vm_build_image
root=$VM_CACHE/rootfs
if [[ ! -x $root/usr/sbin/adduser || ! -d $root/usr/share/ca-certificates ]]; then
    vm_log "installing adduser and ca-certificates into $root"
    { chroot "$root" apt-get update -q &&
        chroot "$root" apt-get install -y --no-install-recommends adduser ca-certificates; } \
        >>"$VM_CACHE/debootstrap.log" 2>&1 || vm_die "apt-get in the image failed, see $VM_CACHE/debootstrap.log"
fi
if [[ ! -f $root$RUNNER ]] || [[ $(cat "$root$RUNNER") != "$(runner_script)" ]]; then
    runner_script >"$root$RUNNER"
    chmod 755 "$root$RUNNER"
    rm -f "$VM_CACHE/rootfs.ext4"
fi
vm_build_image

mkdir -p "$WORK/data"
cp "$DEB" "$WORK/data/ferry.deb"
cp "$HERE/systemd-guest.sh" "$WORK/data/guest.sh"
chmod 755 "$WORK/data/guest.sh"
vm_make_disk "$WORK/disk.img" 512M "$WORK/data"
rm -rf "$WORK/data"

# systemd as PID 1; the test runs as a transient unit and its end powers the VM off.
VM_INIT=
VM_MEM_MB=1024
VM_QEMU_EXTRA=(-chardev "socket,id=ser1,path=$WORK/ttyS1.sock,server=on,wait=off" -serial chardev:ser1)
vm_log "deb: $DEB; booting with systemd as PID 1 (results in $OUT)"
vm_start_nbdkit "$WORK/disk.img" "$WORK/nbd.sock" plain "$OUT/console.nbdkit"
vm_start_qemu "$WORK/nbd.sock" "$OUT/console" \
    "systemd.run=$RUNNER systemd.run_success_action=poweroff systemd.run_failure_action=poweroff"
n=0
until [[ -S $WORK/ttyS1.sock ]]; do
    ((++n < 100)) || vm_die "qemu did not create the second serial port's socket"
    sleep 0.1
done
# The device on ttyS1: a key=value line every 200 ms.
(
    i=0
    while :; do
        i=$((i + 1))
        printf 'count=%d temp=21.5\r\n' "$i"
        sleep 0.2
    done | socat -u - "UNIX-CONNECT:$WORK/ttyS1.sock"
) &
FEEDER=$!
vm_wait_serial "$OUT/console" '^GUEST-UP' 600 || vm_die "the guest did not start the test: $OUT/console"
vm_log "guest up; running the checks"
vm_wait_exit 1200 || vm_die "the guest did not finish within 1200 s: $OUT/console"

result() { tr -d '\r' <"$OUT/console" | grep -a '^RESULT ' | tr ' ' '\n' | sed -n "s/^$1=//p" | tail -n1; }
failed=0
# check KEY EXPECTED-REGEX WHAT
check() {
    local v verdict=ok
    v=$(result "$1")
    [[ $v =~ ^($2)$ ]] || { verdict=FAIL; failed=1; }
    printf '%-28s %-24s %-5s %s\n' "$1" "${v:-<none>}" "$verdict" "$3" | tee -a "$OUT/checks.txt"
}
: >"$OUT/checks.txt"
check pid1 systemd "systemd is PID 1"
check install 0 "dpkg -i of the .deb"
check enabled enabled "the unit is enabled by the package"
check active_after_install active "and started by it"
check user_groups 'ferry,dialout|dialout,ferry' "the service user is in dialout"
check type notify "Type=notify"
check start_rc 0 "systemctl start returned success"
check state_after_start active/running "active when start returned"
check status_answers_after_start 0 "ferry status answers right after start"
check ready_before_running 1 "READY=1 reached systemd before start -> running"
check ttyS1 root:dialout:660 "the serial port is root:dialout 0660"
check serial_records_flowing 0 "records from /dev/ttyS1 reach the spool"
check permission_denied_lines 0 "no permission denied in the unit's journal"
check reload_good_rc 0 "systemctl reload with a good config"
check reload_good_applied 0 "ferry logged the reload"
check reload_good_same_pid 1 "without a restart"
check reload_bad_rc '[1-9][0-9]*' "systemctl reload refuses a bad config"
check reload_bad_state active "the agent keeps running"
check reload_bad_same_pid 1 "the same process"
check watchdog_restarted 0 "a SIGSTOPped ferry is restarted"
check watchdog_journal '[1-9][0-9]*' "systemd logged a watchdog timeout"
check old_pid_gone 1 "the hung process is gone"
check stop_rc 0 "systemctl stop returned success"
check stop_ms '[0-9]{1,4}|[1-3][0-9]{4}|4[0-4][0-9]{3}' "within TimeoutStopSec=45s"
check stop_result success "Result=success (no timeout, no SIGKILL)"
check stop_sigkill 0 "no SIGKILL at stop"
check exposure '[0-9.]+' "systemd-analyze security on the running unit"
vm_log "checks in $OUT/checks.txt; console in $OUT/console"
exit "$failed"
