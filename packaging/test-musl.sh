#!/usr/bin/env bash
# Test of the static musl packages (as root, on a Debian 12 machine):
#
# 1. builds the amd64, arm64 and armhf (ARMv6) musl .debs with `packaging/build-deb.sh --musl`;
# 2. checks each packaged binary is static (no program interpreter, no shared libraries),
#    stripped, of the package's architecture (armhf: ARMv6 code), that the package depends on
#    no libc, and that the arm64 binary is at most 8 MiB;
# 3. runs each packaged binary's `--version` and `validate --config config/ferry.yaml` (and a
#    broken config, which must fail) natively or under qemu-user: arm64 with
#    qemu-aarch64-static, armhf with qemu-arm-static on an ARMv6 CPU (`-cpu arm1176`, the
#    Raspberry Pi Zero/1's) and on an ARMv7 one (`-cpu cortex-a7`, the Pi 2's);
# 4. installs the amd64 .deb with dpkg in minimal Debian 11 (bullseye, glibc 2.31) and 12
#    (bookworm, glibc 2.36) chroots made by debootstrap, runs `ferry --version` and
#    `ferry validate` on the installed config as the service user there, checks that the
#    suite's systemd accepts the unit (`systemd-analyze verify`), and purges it.
#
# Arguments: the architectures to test (default: amd64 arm64 armhf); the chroot installs need
# amd64. FERRY_CHROOTS=DIR keeps the chroots in DIR and reuses them on the next run (otherwise they
# are made in a temporary directory and removed). FERRY_DEBIAN_MIRROR overrides the mirror.
set -euo pipefail
cd "$(dirname "$0")/.."

# Target from the issue; a bigger arm64 binary fails the test.
MAX_ARM64_BYTES=$((8 * 1024 * 1024))
MIRROR=${FERRY_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITES=(bullseye bookworm)
ARCHES=("$@")
((${#ARCHES[@]})) || ARCHES=(amd64 arm64 armhf)
for arch in "${ARCHES[@]}"; do
    case $arch in amd64 | arm64 | armhf) ;; *) echo "usage: $0 [amd64] [arm64] [armhf]" >&2; exit 2 ;; esac
done

start=$SECONDS
section_start=$SECONDS
section() {
    printf '\n=== %s (%ds so far) ===\n' "$*" $((SECONDS - start))
    section_start=$SECONDS
}
ok() { printf 'ok: %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "run as root (debootstrap, chroot, dpkg)"

tmp=$(mktemp -d)
chroots=${FERRY_CHROOTS:-$tmp/chroots}
mkdir -p "$chroots"
# /proc for ferry and ldd; /sys and cgroupfs for systemd-analyze (bullseye's needs a cgroup).
chroot_mount() {
    mount -t proc proc "$1/proc"
    mount -t sysfs sysfs "$1/sys"
    mount -t cgroup2 cgroup2 "$1/sys/fs/cgroup"
}
chroot_umount() {
    local m
    for m in sys/fs/cgroup sys proc; do
        if mountpoint -q "$1/$m"; then umount "$1/$m"; fi
    done
}
cleanup() {
    local rc=$? suite
    for suite in "${SUITES[@]}"; do chroot_umount "$chroots/$suite" || true; done
    # Never remove a tree that still has something mounted in it.
    if findmnt -rn -o TARGET | grep -q "^$tmp"; then
        echo "cleanup: $tmp still has mounts; left in place" >&2
    else
        rm -rf "$tmp"
    fi
    exit "$rc"
}
trap cleanup EXIT

apt_install_missing() {
    local pkg missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        echo "installing: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

section "Tools"
apt_install_missing debootstrap qemu-user-static binutils
echo "tools ready in $((SECONDS - section_start))s"

version="ferry $(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | sed -n 1p)"
bad_config=$tmp/bad.yaml
printf 'device_id: [unclosed\n' >"$bad_config"

# run_checks LABEL RUNNER... BIN: --version and validate (good and bad config).
run_checks() {
    local label=$1 out rc
    shift
    out=$("$@" --version) || fail "$label: --version exited $?"
    [ "$out" = "$version" ] || fail "$label: --version printed '$out', expected '$version'"
    ok "$label: --version: $out"
    out=$("$@" validate --config config/ferry.yaml 2>&1) || fail "$label: validate: $out"
    [ "$out" = ok ] || fail "$label: validate printed: $out"
    ok "$label: validate --config config/ferry.yaml: ok"
    rc=0
    out=$("$@" validate --config "$bad_config" 2>&1) || rc=$?
    [ "$rc" -eq 78 ] || fail "$label: validate of a broken config exited $rc (expected 78): $out"
    ok "$label: validate of a broken config exits 78: $out"
}

declare -A debs
sizes=()
for arch in "${ARCHES[@]}"; do
    section "Build and check the musl $arch .deb"
    deb=$(packaging/build-deb.sh --musl "$arch" | tail -n1)
    echo "built $deb in $((SECONDS - section_start))s"
    debs[$arch]=$deb
    dpkg-deb -f "$deb" Package Version Architecture Depends
    [ "$(dpkg-deb -f "$deb" Package)" = ferry ] || fail "$deb: package is not called ferry"
    [ "$(dpkg-deb -f "$deb" Architecture)" = "$arch" ] || fail "$deb is not $arch"
    depends=$(dpkg-deb -f "$deb" Depends)
    case "$depends" in *libc*) fail "$deb depends on a libc: $depends" ;; esac
    ok "$arch: Depends: $depends (no libc)"

    # The binary as packaged, not the one in target/.
    root=$tmp/$arch
    dpkg-deb -x "$deb" "$root"
    bin=$root/usr/bin/ferry
    readelf -lW "$bin" | grep -q INTERP && fail "$arch: binary has a program interpreter"
    readelf -dW "$bin" | grep -q NEEDED && fail "$arch: binary needs shared libraries"
    readelf -SW "$bin" | grep -q '\.symtab' && fail "$arch: binary is not stripped"
    machine=$(readelf -hW "$bin" | sed -n 's/^ *Machine: *//p')
    ok "$arch: static, stripped, $machine, ELF type $(readelf -hW "$bin" | awk '/Type:/ {print $2}')"
    size=$(stat -c %s "$bin")
    sizes+=("$arch $size $(stat -c %s "$deb")")

    case $arch in
        amd64)
            [ "$machine" = "Advanced Micro Devices X86-64" ] || fail "amd64: machine $machine"
            run_checks "amd64 (native)" "$bin"
            ;;
        arm64)
            [ "$machine" = AArch64 ] || fail "arm64: machine $machine"
            [ "$size" -le "$MAX_ARM64_BYTES" ] || fail "arm64 binary is $size bytes, more than $MAX_ARM64_BYTES"
            run_checks "arm64 (qemu-aarch64-static)" qemu-aarch64-static "$bin"
            ;;
        armhf)
            [ "$machine" = ARM ] || fail "armhf: machine $machine"
            # The build attributes say which architecture the code was compiled for.
            cpu_arch=$(readelf -AW "$bin" | sed -n 's/^ *Tag_CPU_arch: *//p')
            [ "$cpu_arch" = v6 ] || fail "armhf: Tag_CPU_arch is '$cpu_arch', expected v6"
            readelf -AW "$bin" | grep -q 'Tag_ABI_VFP_args: VFP registers' || fail "armhf: not hard-float"
            ok "armhf: Tag_CPU_arch v6, hard-float (VFP registers)"
            run_checks "armhf on ARMv6 (qemu-arm-static -cpu arm1176)" qemu-arm-static -cpu arm1176 "$bin"
            run_checks "armhf on ARMv7 (qemu-arm-static -cpu cortex-a7)" qemu-arm-static -cpu cortex-a7 "$bin"
            ;;
    esac
done

# The arm64 and armhf packages hold the same files as amd64, only the binary differs.
for arch in arm64 armhf; do
    [ -n "${debs[amd64]:-}" ] && [ -n "${debs[$arch]:-}" ] || continue
    diff <(dpkg-deb -c "${debs[amd64]}" | awk '{print $1, $2, $6}' | grep -v ' ./usr/bin/ferry$') \
        <(dpkg-deb -c "${debs[$arch]}" | awk '{print $1, $2, $6}' | grep -v ' ./usr/bin/ferry$') \
        || fail "$arch package contents differ from amd64"
done
[ -n "${debs[amd64]:-}" ] && ok "the packages hold the same files, modes and owners as amd64"

[ -n "${debs[amd64]:-}" ] || SUITES=()
for suite in "${SUITES[@]}"; do
    section "Install the amd64 musl .deb on Debian $suite"
    dir=$chroots/$suite
    if [ ! -x "$dir/usr/bin/dpkg" ]; then
        debootstrap --variant=minbase --include=adduser,ca-certificates,procps,systemd \
            "$suite" "$dir" "$MIRROR" >"$tmp/debootstrap-$suite.log" 2>&1 \
            || { tail -n 20 "$tmp/debootstrap-$suite.log" >&2; fail "debootstrap $suite"; }
        echo "debootstrap $suite in $((SECONDS - section_start))s"
    fi
    chroot_mount "$dir"
    glibc=$(chroot "$dir" ldd --version | sed -n 1p | grep -o '[0-9.]*$')
    echo "$suite: $(cat "$dir/etc/debian_version"), glibc $glibc"
    if chroot "$dir" dpkg-query -W -f='${Status}' ferry 2>/dev/null | grep -qv not-installed; then
        chroot "$dir" dpkg -P ferry >/dev/null
    fi
    cp "${debs[amd64]}" "$dir/tmp/ferry.deb"
    chroot "$dir" dpkg -i /tmp/ferry.deb || fail "$suite: dpkg -i failed"
    chroot "$dir" dpkg-query -W -f='${Status}\n' ferry | grep -q 'install ok installed' \
        || fail "$suite: ferry is not installed"
    ok "$suite (glibc $glibc): dpkg -i installed ferry"
    # The suite's own systemd must know every directive of the unit. verify exits 0 on unknown
    # keys and bad values (it only warns), so its output must be empty.
    systemd=$(chroot "$dir" dpkg-query -W -f='${Version}' systemd)
    out=$(chroot "$dir" systemd-analyze verify --man=no /usr/lib/systemd/system/ferry.service 2>&1) \
        && rc=0 || rc=$?
    [ "$rc" -eq 0 ] && [ -z "$out" ] || { echo "$out"; fail "$suite: systemd-analyze verify: rc $rc"; }
    ok "$suite: systemd $systemd: systemd-analyze verify of the unit: rc 0, no output"
    out=$(chroot "$dir" /usr/bin/ferry --version)
    [ "$out" = "$version" ] || fail "$suite: --version printed '$out'"
    ok "$suite: ferry --version: $out"
    out=$(chroot "$dir" runuser -u ferry -- /usr/bin/ferry validate --config /etc/ferry/ferry.yaml 2>&1) \
        || fail "$suite: validate of the installed config as user ferry: $out"
    [ "$out" = ok ] || fail "$suite: validate printed: $out"
    ok "$suite: ferry validate --config /etc/ferry/ferry.yaml as user ferry: ok"
    chroot "$dir" dpkg -P ferry >/dev/null || fail "$suite: dpkg -P failed"
    chroot "$dir" getent passwd ferry >/dev/null && fail "$suite: user ferry left after purge"
    [ ! -e "$dir/usr/bin/ferry" ] || fail "$suite: /usr/bin/ferry left after purge"
    ok "$suite: purged, user and binary gone"
    chroot_umount "$dir"
    rm -f "$dir/tmp/ferry.deb"
done

section "Sizes"
for line in "${sizes[@]}"; do
    read -r arch bytes debbytes <<<"$line"
    printf '%-6s stripped static binary %9d bytes (%s), .deb %d bytes\n' \
        "$arch" "$bytes" "$(numfmt --to=iec-i --suffix=B "$bytes")" "$debbytes"
done

section "Done"
printf 'musl packaging test passed in %ds\n' $((SECONDS - start))
