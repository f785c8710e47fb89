#!/usr/bin/env bash
# Power-cut test of ferry's spool (issue "Power loss first"). Not part of CI: it boots a VM
# twice per cut and takes about a minute per cut.
#
# ferry runs in a qemu VM (Debian bookworm built with debootstrap, see lib.sh) and tails a
# pre-written file of N lines with no broker reachable, so everything goes to the spool on a
# data disk served by nbdkit. The guest prints `ferry status --json` to the serial console
# every ~150 ms. At a random moment the host SIGKILLs qemu and nbdkit together, then boots
# again and checks: the spool opens (inspect, export) without a crash and was not moved aside,
# every seq the last status reported is there, ferry resumes the file exactly (record k is
# line k with seq k, nothing missing or twice) and no seq reported before the cut is handed
# out again. See docs/RELIABILITY.md, "Power cut".
#
# Cache modes (how the data disk loses writes at the cut):
#   writeback  qemu cache=writeback on nbdkit's file plugin: what the guest wrote to the disk
#              survives (host page cache), what is still in the guest's page cache is lost
#   volatile   as writeback plus nbdkit's cache filter (cache=writeback): the disk has a
#              volatile write cache; writes not followed by a flush are lost with nbdkit
#   hold       volatile, and the guest keeps dirty pages until fsync (no periodic writeback)
#   fast       writeback, and the guest writes dirty pages back within ~100 ms
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/vm/lib.sh
source "$HERE/lib.sh"

usage() {
    cat <<EOF
usage: $0 --ferry PATH [options]
  --ferry PATH      ferry binary to test (glibc, built on Debian 12)
  --modes LIST      comma-separated cache modes (default: writeback,volatile,hold,fast)
  --cuts N          cuts per mode (default 20); every --after-every'th cut comes after ingest
  --after-every K   every K'th cut is made 0.2-3 s after the file was fully committed (default 5)
  --lines N         lines in the input file (default 3000000)
  --min-s S --max-s S  cut window in seconds after ferry started (default 3 and 20)
  --no-control      skip the control cut per mode that shows the disk loses unflushed writes
  --seed N          random seed (default: the current time)
  --cache DIR       image cache (default: \${XDG_CACHE_HOME:-\$HOME/.cache}/ferry-vm)
  --out DIR         results directory (default: DIR/powercut-<date>)
  --summary DIR     only print the summary of the results in DIR (also of a run still going)
Prints one row per cut and one summary table per run; exit status 1 if any cut failed.
EOF
}

FERRY= MODES=writeback,volatile,hold,fast CUTS=20 AFTER_EVERY=5 LINES=3000000
MIN_S=3 MAX_S=20 CONTROL=1 SEED=$(date +%s) OUT= SUMMARY_ONLY=0
VM_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/ferry-vm
while (($#)); do
    case $1 in
    --ferry) FERRY=$2; shift 2 ;;
    --modes) MODES=$2; shift 2 ;;
    --cuts) CUTS=$2; shift 2 ;;
    --after-every) AFTER_EVERY=$2; shift 2 ;;
    --lines) LINES=$2; shift 2 ;;
    --min-s) MIN_S=$2; shift 2 ;;
    --max-s) MAX_S=$2; shift 2 ;;
    --no-control) CONTROL=0; shift ;;
    --seed) SEED=$2; shift 2 ;;
    --cache) VM_CACHE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --summary) OUT=$2; SUMMARY_ONLY=1; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
    esac
done
if ((SUMMARY_ONLY)); then
    FERRY=${FERRY:-?}
elif [[ -z $FERRY || ! -x $FERRY ]]; then
    usage >&2
    vm_die "--ferry must name an executable"
fi
for t in qemu-system-x86_64 nbdkit debootstrap mkfs.ext4 jq awk; do
    command -v "$t" >/dev/null || vm_die "$t is not installed"
done
((EUID == 0 || SUMMARY_ONLY)) || vm_die "run as root (debootstrap, /dev/kvm)"
[[ $CUTS =~ ^[0-9]+$ && $LINES =~ ^[0-9]+$ && $AFTER_EVERY =~ ^[1-9][0-9]*$ ]] || vm_die "bad number"
RANDOM=$SEED
OUT=${OUT:-$VM_CACHE/powercut-$(date +%Y%m%d-%H%M%S)}
if ((SUMMARY_ONLY)); then
    [[ -f $OUT/cuts.tsv ]] || vm_die "no $OUT/cuts.tsv"
    WORK=
else
    mkdir -p "$OUT" "$VM_CACHE"
    WORK=$(mktemp -d "$VM_CACHE/powercut-work.XXXXXX")
fi
cleanup() {
    vm_cleanup
    [[ -z $WORK ]] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mode_cache() { case $1 in volatile | hold) echo volatile ;; writeback | fast) echo plain ;; *) return 1 ;; esac; }
mode_dirty() { case $1 in hold) echo hold ;; fast) echo fast ;; *) echo default ;; esac; }
for m in ${MODES//,/ }; do mode_cache "$m" >/dev/null || vm_die "unknown mode $m"; done

# The pristine data disk: ferry, its config, the guest scripts, and the input file, written
# by mkfs on the host, so it is on the disk before any boot.
prepare_disk() {
    local d=$WORK/data
    mkdir -p "$d"
    cp "$FERRY" "$d/ferry"
    cp "$HERE/powercut-guest.sh" "$d/guest.sh"
    cp "$HERE/check.awk" "$d/check.awk"
    chmod 755 "$d/ferry" "$d/guest.sh"
    seq -f 'line %09.0f abcdefghijklmnopqrstuvwxyz0123456789' 1 "$LINES" >"$d/input.log"
    head -c 8192 /dev/zero | tr '\0' x >"$d/control-direct.bin"
    cat >"$d/ferry.yaml" <<EOF
device_id: powercut
log_level: info
status_socket: /run/ferry.sock
spool:
  dir: /data/spool
  max_bytes: 2147483648          # nothing is evicted
uplink:
  host: 127.0.0.1
  port: 1                        # no broker: everything stays in the spool
  topic_prefix: ferry
collectors:
  - type: file
    name: lines
    path: /data/input.log
    start_at: beginning
EOF
    "$d/ferry" validate --config "$d/ferry.yaml" >/dev/null || vm_die "the test config does not validate"
    vm_make_disk "$WORK/pristine.img" 3G "$d"
    rm -rf "$d"
}

# boot_vm CACHE SERIAL APPEND: a fresh nbdkit on $WORK/disk.img and a VM on it.
boot_vm() {
    vm_start_nbdkit "$WORK/disk.img" "$WORK/nbd.sock" "$1" "$2.nbdkit"
    vm_start_qemu "$WORK/nbd.sock" "$2" "$3"
}

# last_status SERIAL: the last complete FERRYSTAT line's JSON (empty if none); fails if the
# markers are not strictly increasing.
last_status() {
    local f=$1
    # (Only whole lines: the last one may be cut off in the middle of its number.)
    tr -d '\r' <"$f" | grep -a '^FERRYSTAT .*}$' | awk '{ if ($2 + 0 <= last) bad = 1; last = $2 + 0 } END { exit bad }' ||
        vm_log "warning: FERRYSTAT markers not increasing in $f"
    tr -d '\r' <"$f" | grep -a '^FERRYSTAT ' | tail -n 3 | tac | while read -r _ _ json; do
        if jq -e . >/dev/null 2>&1 <<<"$json"; then
            printf '%s\n' "$json"
            break
        fi
    done
}

stat_seq() { jq -r '[.spool.streams[] | select(.name == "lines") | .next_seq - 1] | (.[0] // 0)' <<<"$1"; }
# result KEY SERIAL: value of KEY in the RESULT lines (empty if absent).
result() { tr -d '\r' <"$2" | grep -a '^RESULT ' | tr ' ' '\n' | sed -n "s/^$1=//p" | tail -n1; }

# control MODE: writes a synced file, a buffered file and an O_DIRECT block without flush,
# cuts 1 s later and reports what survived.
control() {
    local mode=$1 token=$RANDOM$RANDOM s=$OUT/$1-control
    cp --sparse=always "$WORK/pristine.img" "$WORK/disk.img"
    boot_vm "$(mode_cache "$mode")" "$s.serial" "ferry_job=control ferry_token=$token ferry_dirty=$(mode_dirty "$mode")"
    vm_wait_serial "$s.serial" '^CONTROL-WRITTEN' 240 || vm_die "control boot failed: $s.serial"
    sleep 1
    vm_power_cut
    boot_vm plain "$s.check" "ferry_job=control_check ferry_token=$token"
    vm_wait_exit 240 || vm_die "control check boot did not finish: $s.check"
    printf '%s\t%s\t%s\t%s\n' "$mode" "$(result control_synced "$s.check")" \
        "$(result control_buffered "$s.check")" "$(result control_direct "$s.check")" >>"$OUT/controls.tsv"
}

# cut MODE I: one power cut and its check; appends a row to $OUT/cuts.tsv.
cut() {
    local mode=$1 i=$2 s kind delay
    s=$OUT/$mode-$(printf %02d "$i")
    cp --sparse=always "$WORK/pristine.img" "$WORK/disk.img"
    boot_vm "$(mode_cache "$mode")" "$s.serial" "ferry_job=ingest ferry_dirty=$(mode_dirty "$mode")"
    vm_wait_serial "$s.serial" '^FERRY-STARTED' 240 || vm_die "ingest boot failed: $s.serial"
    local t0=$SECONDS
    if ((i % AFTER_EVERY == 0)); then
        kind=after
        # Until a status reports the whole file committed, then 0.2-3 s more.
        local n=0
        until [[ $(stat_seq "$(last_status "$s.serial")") == "$LINES" ]]; do
            ((++n < 3000)) || vm_die "ingest did not finish in 300 s: $s.serial"
            sleep 0.1
        done
        delay=$(printf '%d.%d' $((RANDOM % 3)) $((2 + RANDOM % 8)))
    else
        kind=ingest
        delay=$(printf '%d.%d' $((MIN_S + RANDOM % (MAX_S - MIN_S))) $((RANDOM % 10)))
    fi
    sleep "$delay"
    vm_power_cut
    local st reported committed
    st=$(last_status "$s.serial")
    [[ -n $st ]] || vm_die "no status reached the console before the cut: $s.serial"
    reported=$(stat_seq "$st")
    committed=$(jq -r .counters.committed <<<"$st")
    local elapsed=$((SECONDS - t0))
    grep -aq '^FERRY-DIED' "$s.serial" && vm_log "ferry died during ingest: $s.serial"

    boot_vm plain "$s.check" "ferry_job=check ferry_reported=$reported ferry_total=$LINES"
    vm_wait_exit 1500 || vm_log "check boot timed out: $s.check"
    local aside aside2 crash present lost reuse exact verdict
    r() { local v; v=$(result "$1" "$s.check"); echo "${v:-NA}"; }
    aside=$(r aside) aside2=$(r aside_after)
    crash=0
    for k in inspect_panic export_panic resume_panic export2_panic; do
        [[ $(r $k) == 0 ]] || crash=1
    done
    for k in inspect_rc export_rc export2_rc; do
        [[ $(r $k) == 0 ]] || crash=1
    done
    [[ $(r resume_died) == 0 ]] || crash=1
    present=$(r pre_le_reported)
    [[ $present =~ ^[0-9]+$ ]] && lost=$((reported - present)) || lost=$reported
    reuse=$(r final_reused)
    exact=no
    [[ $(r final_count) == "$LINES" && $(r final_inexact) == 0 ]] && exact=yes
    verdict=PASS
    if ((lost != 0 || crash != 0)) || [[ $aside != 0 || $aside2 != 0 || $reuse != 0 || $exact != yes ]]; then
        verdict=FAIL
    fi
    local phase=ingesting
    ((reported == LINES)) && phase=finished
    printf '%s\t%d\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$i" "$kind" "$delay" \
        "$elapsed" "$phase" "$committed" "$reported" "$present" "$lost" "$crash" "$aside/$aside2" \
        "$reuse" "$exact" "$verdict" | tee -a "$OUT/cuts.tsv" >&2
}

summary() {
    echo
    if ((!SUMMARY_ONLY)); then
        echo "ferry: $FERRY ($("$FERRY" --version 2>/dev/null || echo '?'))  lines: $LINES  seed: $SEED  results: $OUT"
    fi
    if [[ -s $OUT/controls.tsv ]]; then
        echo
        echo "Control (1 s before the cut; 1 = survived): mode, synced file, buffered file (no fsync), O_DIRECT block (no flush)"
        column -t -s $'\t' "$OUT/controls.tsv"
    fi
    echo
    awk -F'\t' '
        { m = $1; if (!(m in cuts)) order[++nm] = m
          cuts[m]++; fin[m] += ($6 == "finished"); rep[m] += $8; pres[m] += ($9 ~ /^[0-9]+$/ ? $9 : 0)
          lost[m] += $10; lostcuts[m] += ($10 != 0); crash[m] += $11; aside[m] += ($12 != "0/0")
          reuse[m] += ($13 != 0); exact[m] += ($14 == "yes"); fail[m] += ($15 == "FAIL") }
        END {
          printf "%-10s %5s %9s %14s %14s %12s %8s %12s %10s %9s %6s\n", "mode", "cuts", "finished",
              "committed", "present", "lost (cuts)", "panics", "moved aside", "seq reuse", "exact", "FAIL"
          for (i = 1; i <= nm; i++) { m = order[i]
            printf "%-10s %5d %9d %14d %14d %12s %8d %12d %10d %9s %6d\n", m, cuts[m], fin[m], rep[m],
                pres[m], lost[m] " (" lostcuts[m] ")", crash[m], aside[m], reuse[m], exact[m] "/" cuts[m], fail[m] }
        }' "$OUT/cuts.tsv"
    echo "(committed = sum over cuts of the highest seq the last status before the cut reported;"
    echo " present = how many of those the spool held after the cut; panics = a crash or error opening"
    echo " the spool or resuming; seq reuse = cuts where a reported seq was handed out again; exact ="
    echo " cuts after which the resumed file had line k at seq k for every k, nothing missing or twice)"
}

if ((SUMMARY_ONLY)); then
    summary
    exit 0
fi
vm_build_image
vm_log "accelerator: $(vm_accel); preparing the data disk ($LINES lines)"
prepare_disk
printf 'mode\tcut\tkind\tdelay_s\telapsed_s\tphase\tcommitted\treported_seq\tpresent\tlost\tcrash\taside\treuse\texact\tverdict\n' >&2
: >"$OUT/cuts.tsv"
: >"$OUT/controls.tsv"
for mode in ${MODES//,/ }; do
    if ((CONTROL)); then control "$mode"; fi
    for ((i = 1; i <= CUTS; i++)); do
        cut "$mode" "$i"
    done
done
summary | tee "$OUT/summary.txt"
! grep -q 'FAIL$' "$OUT/cuts.tsv"
