#!/usr/bin/env bash
# Packaging test, run by .ci/run after the test suite (as root, on a Debian 12 machine):
#
# 1. builds the amd64 .deb, installs it with dpkg and checks the user, files, modes, conffile,
#    unit (systemd-analyze verify and security), `ferry validate` on the installed config as
#    the service user, and a short run of the agent as that user;
# 2. purges it and checks that nothing is left;
# 3. builds the arm64 and armhf binaries and runs `ferry --version` and `ferry validate`
#    under qemu-user.
#
# Refuses to run if ferry is already installed or a user "ferry" exists (it would purge
# them). Purges what it installed even when a check fails. PID 1 need not be systemd: the
# package's scripts only call systemctl when systemd runs, and systemd-analyze works offline.
set -euo pipefail
cd "$(dirname "$0")/.."

# The highest systemd-analyze security exposure accepted (docs/PACKAGING.md has the figure).
MAX_EXPOSURE=2.0
# Target from the issue; a bigger arm64 binary fails the test.
MAX_ARM64_BYTES=$((8 * 1024 * 1024))
# How long the installed agent runs as the ferry user before SIGTERM.
SMOKE_RUN_S=5

start=$SECONDS
section_start=$SECONDS
section() {
    printf '\n=== %s (%ds so far) ===\n' "$*" $((SECONDS - start))
    section_start=$SECONDS
}
ok() { printf 'ok: %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
installed() { dpkg-query -W -f='${Status}' ferry 2>/dev/null | grep -q 'install ok installed'; }

[ "$(id -u)" -eq 0 ] || fail "run as root (installs and purges the package)"
if installed || dpkg-query -W -f='${Status}' ferry 2>/dev/null | grep -q config-files; then
    fail "ferry is already installed on this machine; not touching it"
fi
getent passwd ferry >/dev/null && fail "a user 'ferry' exists but the package is not installed; not touching it"

smoke_pid=
cleanup() {
    local rc=$?
    if [ -n "$smoke_pid" ]; then kill -KILL "$smoke_pid" 2>/dev/null || true; fi
    if dpkg-query -W -f='${Status}' ferry 2>/dev/null | grep -qv 'not-installed'; then
        echo "cleanup: purging ferry" >&2
        dpkg -P ferry >/dev/null 2>&1 || echo "cleanup: dpkg -P ferry failed" >&2
    fi
    [ -n "${tmp:-}" ] && rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
tmp=$(mktemp -d)

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

# `objdump -T`: the newest GLIBC_x.y a binary references.
glibc_needed() { "$1" -T "$2" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1; }

section "Tools"
# The package's dependencies (dpkg -i does not fetch them), systemd-analyze, qemu-user.
apt_install_missing ca-certificates adduser procps systemd qemu-user-static binutils
echo "tools ready in $((SECONDS - section_start))s"

section "Build amd64 .deb"
deb=$(packaging/build-deb.sh amd64 | tail -n1)
echo "built $deb in $((SECONDS - section_start))s"
dpkg-deb -I "$deb" | sed -n '/Package:/,$p'
dpkg-deb -c "$deb" | awk '{print $1, $2, $6}'

depends=$(dpkg-deb -f "$deb" Depends)
declared=$(sed -n 's/.*libc6 (>= \([0-9.]*\)).*/\1/p' <<<"$depends")
[ -n "$declared" ] || fail "Depends has no libc6 floor: $depends"
for dep in ca-certificates adduser procps; do
    grep -qw "$dep" <<<"$depends" || fail "Depends lacks $dep: $depends"
done

section "Install"
dpkg -i "$deb"
installed || fail "dpkg -i did not leave ferry installed"
ok "installed $(dpkg-query -W -f='${Version} ${Architecture}' ferry)"

getent passwd ferry >/dev/null || fail "no user ferry"
[ "$(getent passwd ferry | cut -d: -f7)" = /usr/sbin/nologin ] || fail "user ferry has a login shell"
getent group ferry >/dev/null || fail "no group ferry"
id -nG ferry | tr ' ' '\n' | grep -qx dialout || fail "ferry is not in dialout ($(id -nG ferry))"
ok "user: $(id ferry)"

version=$(/usr/bin/ferry --version)
grep -q "^ferry " <<<"$version" || fail "ferry --version printed: $version"
ok "/usr/bin/ferry --version: $version"

conf=/etc/ferry/ferry.yaml
[ -f "$conf" ] || fail "$conf missing"
[ "$(stat -c '%U:%G %a' "$conf")" = "root:ferry 640" ] || fail "$conf is $(stat -c '%U:%G %a' "$conf"), want root:ferry 640"
cmp -s "$conf" config/ferry.production.yaml || fail "$conf differs from config/ferry.production.yaml"
dpkg-query -W -f='${Conffiles}\n' ferry | grep -q " $conf " || fail "$conf is not a conffile"
ok "$conf: root:ferry 640, conffile"

[ "$(stat -c '%U:%G %a' /var/lib/ferry)" = "ferry:ferry 750" ] || fail "/var/lib/ferry is $(stat -c '%U:%G %a' /var/lib/ferry)"
ok "/var/lib/ferry: ferry:ferry 750"

unit=/usr/lib/systemd/system/ferry.service
[ -f "$unit" ] || fail "$unit missing"
cmp -s "$unit" systemd/ferry.service || fail "$unit differs from systemd/ferry.service"
[ -L /etc/systemd/system/multi-user.target.wants/ferry.service ] || fail "ferry.service is not enabled"
ok "$unit installed and enabled"

[ -f /usr/share/man/man1/ferry.1.gz ] || fail "man page missing"
man_warnings=$(zcat /usr/share/man/man1/ferry.1.gz | groff -man -Tutf8 -ww -z 2>&1 || true)
[ -z "$man_warnings" ] || { echo "$man_warnings"; fail "groff warns about ferry.1"; }
[ -f /usr/share/doc/ferry/PACKAGING.md ] || [ -f /usr/share/doc/ferry/PACKAGING.md.gz ] || fail "docs missing"
ok "man page and docs installed"

out=$(runuser -u ferry -- /usr/bin/ferry validate --config "$conf" 2>&1) || fail "ferry validate as ferry: $out"
[ "$out" = ok ] || fail "ferry validate as ferry printed: $out"
ok "runuser -u ferry -- ferry validate --config $conf: $out"
if runuser -u nobody -- /usr/bin/ferry validate --config "$conf" >/dev/null 2>&1; then
    fail "user nobody can read $conf"
fi
ok "other users cannot read $conf"

section "systemd-analyze"
# verify exits 0 on unknown keys and bad values (it only warns), so stderr must be empty.
out=$(systemd-analyze verify --man=no "$unit" 2>&1) && rc=0 || rc=$?
[ "$rc" -eq 0 ] && [ -z "$out" ] || { echo "$out"; fail "systemd-analyze verify: rc $rc"; }
ok "systemd-analyze verify --man=no $unit: rc 0, no output"
security=$(systemd-analyze security --offline=yes --threshold="$(awk "BEGIN{print $MAX_EXPOSURE*10}")" "$unit" 2>&1) && rc=0 || rc=$?
grep -v '✓' <<<"$security"
[ "$rc" -eq 0 ] || fail "exposure above $MAX_EXPOSURE"
exposure=$(grep -o 'exposure level for ferry.service: [0-9.]*' <<<"$security" | awk '{print $NF}')
ok "systemd-analyze security --offline=yes: exposure $exposure (max $MAX_EXPOSURE)"

section "Run the installed agent as ferry for ${SMOKE_RUN_S}s"
# The broker in the shipped config (mqtt.example.com) is not reachable: the agent samples into
# the spool and retries. SIGTERM must stop it cleanly (exit 0).
runuser -u ferry -- /usr/bin/ferry run --config "$conf" >"$tmp/run.log" 2>&1 &
smoke_pid=$!
sleep "$SMOKE_RUN_S"
kill -0 "$smoke_pid" 2>/dev/null || { cat "$tmp/run.log"; fail "the agent died within ${SMOKE_RUN_S}s"; }
ps -o pid,user,rss,nlwp,args --ppid "$smoke_pid" | tail -n +2 || true
kill -TERM "$(pgrep -P "$smoke_pid" || echo "$smoke_pid")"
wait "$smoke_pid" && rc=0 || rc=$?
smoke_pid=
tail -n 5 "$tmp/run.log"
[ "$rc" -eq 0 ] || { cat "$tmp/run.log"; fail "ferry run exited $rc after SIGTERM"; }
[ -d /var/lib/ferry/spool ] || fail "no spool in /var/lib/ferry/spool"
[ "$(stat -c %U /var/lib/ferry/spool)" = ferry ] || fail "spool not owned by ferry"
ok "ran as ferry, wrote /var/lib/ferry/spool, exit 0 on SIGTERM"

section "Purge"
dpkg -P ferry
for path in /usr/bin/ferry /etc/ferry /var/lib/ferry "$unit" \
    /etc/systemd/system/multi-user.target.wants/ferry.service \
    /usr/share/man/man1/ferry.1.gz /usr/share/doc/ferry; do
    [ ! -e "$path" ] && [ ! -L "$path" ] || fail "$path left after purge"
done
getent passwd ferry >/dev/null && fail "user ferry left after purge"
getent group ferry >/dev/null && fail "group ferry left after purge"
dpkg-query -W -f='${Status}' ferry 2>/dev/null | grep -qv 'not-installed' && fail "dpkg still knows ferry"
leftovers=$(find /etc/systemd /var/lib/systemd -name '*ferry*' 2>/dev/null || true)
[ -z "$leftovers" ] || fail "systemd leftovers: $leftovers"
ok "nothing left: binary, /etc/ferry, /var/lib/ferry, unit, enablement, user, group"

section "Cross builds under qemu-user"
sizes=()
host_objdump=$(command -v x86_64-linux-gnu-objdump || command -v objdump)
amd64_bin=${CARGO_TARGET_DIR:-target}/release/ferry
sizes+=("amd64 $(stat -c %s "$amd64_bin") GLIBC_$(glibc_needed "$host_objdump" "$amd64_bin")")
for arch in arm64 armhf; do
    section_start=$SECONDS
    case $arch in
        arm64) triple=aarch64-unknown-linux-gnu; gnu=aarch64-linux-gnu; qemu=qemu-aarch64-static ;;
        armhf) triple=armv7-unknown-linux-gnueabihf; gnu=arm-linux-gnueabihf; qemu=qemu-arm-static ;;
    esac
    deb=$(packaging/build-deb.sh "$arch" | tail -n1)
    [ "$(dpkg-deb -f "$deb" Architecture)" = "$arch" ] || fail "$deb is not $arch"
    bin=${CARGO_TARGET_DIR:-target}/$triple/release/ferry
    echo "built $deb in $((SECONDS - section_start))s"
    "$gnu-readelf" -S "$bin" | grep -q '\.symtab' && fail "$bin is not stripped"
    out=$("$qemu" -L "/usr/$gnu" "$bin" --version)
    [ "$out" = "$version" ] || fail "$arch ferry --version under qemu: $out"
    ok "$arch: $qemu ferry --version: $out"
    out=$("$qemu" -L "/usr/$gnu" "$bin" validate --config config/ferry.yaml 2>&1) || fail "$arch validate: $out"
    [ "$out" = ok ] || fail "$arch validate printed: $out"
    ok "$arch: $qemu ferry validate --config config/ferry.yaml: ok"
    sizes+=("$arch $(stat -c %s "$bin") GLIBC_$(glibc_needed "$gnu-objdump" "$bin")")
done

section "Sizes and glibc floor"
newest=0
for line in "${sizes[@]}"; do
    read -r arch bytes glibc <<<"$line"
    printf '%-6s stripped binary %9d bytes (%s), needs %s\n' "$arch" "$bytes" "$(numfmt --to=iec-i --suffix=B "$bytes")" "$glibc"
    newest=$(printf '%s\n%s\n' "$newest" "${glibc#GLIBC_}" | sort -V | tail -n1)
    if [ "$arch" = arm64 ] && [ "$bytes" -gt "$MAX_ARM64_BYTES" ]; then
        fail "arm64 binary is $bytes bytes, more than $MAX_ARM64_BYTES"
    fi
done
# Depends must say what the binaries need: not less (it would install where it cannot run),
# not more (it would refuse systems where it runs).
[ "$newest" = "$declared" ] || fail "binaries need glibc $newest, Depends says libc6 (>= $declared)"
ok "Depends libc6 (>= $declared) matches the newest GLIBC_ symbol version the binaries use"

section "Done"
printf 'packaging test passed in %ds (exposure %s)\n' $((SECONDS - start)) "$exposure"
