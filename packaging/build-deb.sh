#!/usr/bin/env bash
# Builds the ferry .deb for one Debian architecture:
#
#   packaging/build-deb.sh amd64|arm64|armhf
#
# amd64 = x86_64-unknown-linux-gnu, arm64 = aarch64-unknown-linux-gnu,
# armhf = armv7-unknown-linux-gnueabihf (ARMv7: Raspberry Pi 2/3/4 on a 32-bit OS; not ARMv6).
# Installs what is missing: the rust target (rustup), Debian's cross gcc and libc (apt, as
# root) and cargo-deb (cargo install --locked). Honours CARGO_TARGET_DIR.
# Prints the .deb path last on stdout (for scripts: `deb=$(packaging/build-deb.sh arm64 | tail -n1)`);
# everything else goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

# cargo-deb release whose output and options docs/PACKAGING.md describes.
CARGO_DEB_VERSION=3.8.0

log() { printf '[build-deb] %s\n' "$*" >&2; }
die() { printf '[build-deb] error: %s\n' "$*" >&2; exit 1; }

arch=${1:-}
case "$arch" in
    amd64) triple=x86_64-unknown-linux-gnu; gnu=x86_64-linux-gnu; apt_pkgs=() ;;
    arm64) triple=aarch64-unknown-linux-gnu; gnu=aarch64-linux-gnu
           apt_pkgs=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
    armhf) triple=armv7-unknown-linux-gnueabihf; gnu=arm-linux-gnueabihf
           apt_pkgs=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross) ;;
    *) die "usage: $0 amd64|arm64|armhf" ;;
esac

# A cross build for the host triple would use a separate target dir and rebuild everything,
# so amd64 on an x86_64 host is a plain `cargo build --release`.
host=$(rustc -vV | sed -n 's/^host: //p')
if [ "$triple" = "$host" ]; then
    target_args=()
    bin_dir=release
else
    target_args=(--target "$triple")
    bin_dir="$triple/release"
fi
target_dir=${CARGO_TARGET_DIR:-target}

apt_missing() {
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || echo "$pkg"
    done
}

# Cross compilers and the target's libc (crt files, libc.so) from Debian.
mapfile -t missing < <(apt_missing "${apt_pkgs[@]}")
if ((${#missing[@]})); then
    [ "$(id -u)" -eq 0 ] || die "missing packages: ${missing[*]}; run: sudo apt-get install -y ${missing[*]}"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ "$triple" != "$host" ] && ! rustup target list --installed | grep -qx "$triple"; then
    log "rustup target add $triple"
    rustup target add "$triple" >&2
fi

if ! cargo deb --version >/dev/null 2>&1; then
    log "cargo install cargo-deb $CARGO_DEB_VERSION"
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked >&2
fi

log "cargo build --release ${target_args[*]}"
cargo build --release --locked "${target_args[@]}" >&2

# --no-build: the binary is already built with the same profile; cargo-deb would otherwise
# run cargo again (same result, more output). --no-strip: profile.release has strip = true,
# and the host strip cannot handle foreign binaries anyway.
log "cargo deb ${target_args[*]}"
deb=$(cargo deb --no-build --no-strip "${target_args[@]}" | tail -n1)
[ -f "$deb" ] || die "cargo deb did not report a .deb (got: $deb)"

bin="$target_dir/$bin_dir/ferry"
size=$(stat -c %s "$bin")
# The cross binutils come with the cross gcc; the host objdump may not know the machine.
objdump=$(command -v "$gnu-objdump" || command -v objdump)
glibc=$("$objdump" -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n1)
log "$arch: binary $bin, stripped, $size bytes ($(numfmt --to=iec-i --suffix=B "$size")); needs ${glibc:-no versioned glibc symbols}"
log "$arch: package $(stat -c %s "$deb") bytes"
echo "$deb"
