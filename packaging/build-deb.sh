#!/usr/bin/env bash
# Builds the ferry .deb for one Debian architecture:
#
#   packaging/build-deb.sh [--musl] amd64|arm64|armhf
#
# glibc (default): amd64 = x86_64-unknown-linux-gnu, arm64 = aarch64-unknown-linux-gnu,
# armhf = armv7-unknown-linux-gnueabihf (ARMv7: Raspberry Pi 2/3/4 on a 32-bit OS; not ARMv6);
# the package depends on libc6 (>= 2.34).
# --musl: a static binary that needs no libc, so the package installs on Debian 11 and 12 /
# Raspberry Pi OS bullseye and bookworm: amd64 = x86_64-unknown-linux-musl, arm64 =
# aarch64-unknown-linux-musl (both linked by Debian's gcc / cross gcc against the musl that
# ships with the rust target), armhf = arm-unknown-linux-musleabihf (ARMv6 + VFP2, hard float:
# Raspberry Pi Zero/1 and every later Pi on a 32-bit OS; built with cargo-zigbuild and zig
# from PyPI, which brings musl for that CPU). docs/PACKAGING.md explains the choice.
# Installs what is missing: the rust target (rustup), Debian's cross gcc and libc (apt, as
# root), cargo-deb and, for musl armhf, cargo-zigbuild (cargo install --locked) and zig (pip).
# Honours CARGO_TARGET_DIR.
# Prints the .deb path last on stdout (for scripts: `deb=$(packaging/build-deb.sh arm64 | tail -n1)`);
# everything else goes to stderr. musl packages go to target/debian/musl/.
set -euo pipefail
cd "$(dirname "$0")/.."

# cargo-deb release whose output and options docs/PACKAGING.md describes.
CARGO_DEB_VERSION=3.8.0
# Versions of the zig toolchain for the musl armhf (ARMv6) build.
CARGO_ZIGBUILD_VERSION=0.24.0
ZIGLANG_VERSION=0.17.0

log() { printf '[build-deb] %s\n' "$*" >&2; }
die() { printf '[build-deb] error: %s\n' "$*" >&2; exit 1; }

musl=false
if [ "${1:-}" = --musl ]; then
    musl=true
    shift
fi
arch=${1:-}
usage="usage: $0 [--musl] amd64|arm64|armhf"
# linker: gcc = Debian's gcc links (the cc crate compiles the C parts with the same gcc);
# zig = cargo-zigbuild.
linker=gcc
if ! $musl; then
    case "$arch" in
        amd64) triple=x86_64-unknown-linux-gnu; gnu=x86_64-linux-gnu; apt_pkgs=() ;;
        arm64) triple=aarch64-unknown-linux-gnu; gnu=aarch64-linux-gnu
               apt_pkgs=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
        armhf) triple=armv7-unknown-linux-gnueabihf; gnu=arm-linux-gnueabihf
               apt_pkgs=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross) ;;
        *) die "$usage" ;;
    esac
else
    # The C parts (ring, zstd) only need the C headers of a libc for memcpy, malloc and the
    # like; they are linked against musl. .cargo/config.toml names the linkers and compilers.
    case "$arch" in
        amd64) triple=x86_64-unknown-linux-musl; gnu=x86_64-linux-gnu; apt_pkgs=() ;;
        arm64) triple=aarch64-unknown-linux-musl; gnu=aarch64-linux-gnu
               apt_pkgs=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
        armhf) triple=arm-unknown-linux-musleabihf; gnu=arm-linux-gnueabihf; linker=zig
               apt_pkgs=() ;;
        *) die "$usage" ;;
    esac
fi

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

# std for the target: from rustup; if rustup cannot fetch it (a mirror that lacks it), std is
# built from source (rust-src, -Z build-std; RUSTC_BOOTSTRAP lets a stable rustc take -Z).
build_std=()
if [ "$triple" != "$host" ] && ! rustup target list --installed | grep -qx "$triple"; then
    log "rustup target add $triple"
    if ! rustup target add "$triple" >&2; then
        $musl || die "rustup target add $triple failed"
        log "no rust-std for $triple from rustup: building std from source (rust-src)"
        rustup component add rust-src >&2
        build_std=(-Z build-std=std,panic_abort)
        export RUSTC_BOOTSTRAP=1
    fi
fi

if ! cargo deb --version >/dev/null 2>&1; then
    log "cargo install cargo-deb $CARGO_DEB_VERSION"
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked >&2
fi

build=(build)
if [ "$linker" = zig ]; then
    # zig from PyPI (a wheel with the zig binary); cargo-zigbuild finds it as `python3 -m ziglang`.
    if ! python3 -m ziglang version >/dev/null 2>&1; then
        log "pip install ziglang==$ZIGLANG_VERSION"
        python3 -m pip install --quiet "ziglang==$ZIGLANG_VERSION" >&2
    fi
    if ! cargo zigbuild --version >/dev/null 2>&1; then
        log "cargo install cargo-zigbuild $CARGO_ZIGBUILD_VERSION"
        cargo install cargo-zigbuild --version "$CARGO_ZIGBUILD_VERSION" --locked >&2
    fi
    build=(zigbuild)
fi

log "cargo ${build[*]} --release ${target_args[*]} ${build_std[*]}"
cargo "${build[@]}" --release --locked "${target_args[@]}" "${build_std[@]}" >&2

# --no-build: the binary is already built with the same profile; cargo-deb would otherwise
# run cargo again (same result, more output). --no-strip: profile.release has strip = true,
# and the host strip cannot handle foreign binaries anyway.
deb_args=(--no-build --no-strip "${target_args[@]}")
if $musl; then
    # Same package name and file name as the glibc build, so a directory of its own.
    deb_args+=(--variant musl --output "$target_dir/debian/musl/")
fi
log "cargo deb ${deb_args[*]}"
deb=$(cargo deb "${deb_args[@]}" | tail -n1)
[ -f "$deb" ] || die "cargo deb did not report a .deb (got: $deb)"

bin="$target_dir/$bin_dir/ferry"
size=$(stat -c %s "$bin")
if $musl; then
    # Static: no program interpreter (ld.so) and no shared libraries.
    ! readelf -lW "$bin" | grep -q 'INTERP' || die "$bin asks for a program interpreter: not static"
    ! readelf -dW "$bin" | grep -q 'NEEDED' || die "$bin needs shared libraries: not static"
    needs="no libc (static; ELF type $(readelf -hW "$bin" | awk '/Type:/ {print $2}'))"
else
    # The cross binutils come with the cross gcc; the host objdump may not know the machine.
    objdump=$(command -v "$gnu-objdump" || command -v objdump)
    glibc=$("$objdump" -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n1)
    needs=${glibc:-no versioned glibc symbols}
fi
log "$arch: binary $bin, stripped, $size bytes ($(numfmt --to=iec-i --suffix=B "$size")); needs $needs"
log "$arch: package $(stat -c %s "$deb") bytes"
echo "$deb"
