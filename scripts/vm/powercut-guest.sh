#!/bin/sh
# Runs inside the power-cut VM as /data/guest.sh (started by /sbin/ferry-vm-init). Its job comes
# from the kernel command line (powercut.sh sets it):
#   ferry_job=ingest    start ferry on the pre-written /data/input.log and print
#                       `FERRYSTAT <n> <status json>` to the console every ~150 ms until killed
#   ferry_job=check     after a cut: open the spool (inspect, export), count what survived of
#                       ferry_reported (the last seq the last status reported), resume ferry to
#                       the end of the file, export again and check line n carries seq n
#   ferry_job=control   write three files (buffered, O_DIRECT without flush, synced), then wait
#   ferry_job=control_check  print what of them survived
# Results are printed as `RESULT key=value ...` lines; powercut.sh parses them.
set -u
F=/data/ferry
C=/data/ferry.yaml
STREAM=lines

# The status document `ferry status --json` prints, read from the agent's socket with socat
# (starting the ferry binary for each poll is too slow for ~150 ms without KVM).
status_json() {
    if command -v socat >/dev/null; then
        printf 'status\n' | socat -t 2 - UNIX-CONNECT:/run/ferry.sock 2>/dev/null
    else
        "$F" status --json --config "$C" 2>/dev/null
    fi
}

status_next_seq() {
    # next_seq of $STREAM in a status/inspect JSON document on stdin (0 when absent).
    tr '{' '\n' | grep "\"name\":\"$STREAM\"" | sed -n 's/.*"next_seq":\([0-9]*\).*/\1/p' | head -n1
}

job_ingest() {
    case "${ferry_dirty:-default}" in
    hold)
        # Dirty pages stay in RAM until fsync (no periodic writeback, no expiry, high limits).
        sysctl -q -w vm.dirty_writeback_centisecs=0 vm.dirty_expire_centisecs=360000 \
            vm.dirty_background_ratio=80 vm.dirty_ratio=90
        ;;
    fast)
        # Dirty pages go to the disk within ~100 ms, in the kernel's order, not the program's.
        sysctl -q -w vm.dirty_writeback_centisecs=10 vm.dirty_expire_centisecs=10
        ;;
    esac
    echo "RESULT dirty=$(cat /proc/sys/vm/dirty_writeback_centisecs),$(cat /proc/sys/vm/dirty_expire_centisecs)"
    "$F" run --config "$C" >/run/ferry.log 2>&1 &
    pid=$!
    echo "FERRY-STARTED"
    i=0
    while [ "$i" -lt 20000 ]; do
        i=$((i + 1))
        s=$(status_json)
        if [ -n "$s" ]; then
            echo "FERRYSTAT $i $s"
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "FERRY-DIED"
            tail -n 20 /run/ferry.log
            return 1
        fi
        sleep 0.15
    done
}

# check.awk over an export on stdin; $1 = pre|final.
check_export() {
    awk -v R="$ferry_reported" -v PHASE="$1" -v PRE=/run/pre-seqs -f /data/check.awk
}

job_check() {
    aside=$(ls -d /data/spool.corrupt-* 2>/dev/null | wc -l)
    echo "RESULT aside=$aside"
    "$F" spool inspect --json --config "$C" >/run/inspect.json 2>/run/inspect.err
    rc=$?
    echo "RESULT inspect_rc=$rc inspect_panic=$(grep -c panicked /run/inspect.err)"
    echo "INSPECT $(cat /run/inspect.json)"
    head -c 600 /run/inspect.err
    "$F" spool export --config "$C" --stream "$STREAM" 2>/run/export.err | check_export pre
    rc=$?
    echo "RESULT export_rc=$rc export_panic=$(grep -c panicked /run/export.err)"
    head -c 600 /run/export.err

    # Resume: ferry must finish the file from its committed position.
    "$F" run --config "$C" >/run/ferry2.log 2>&1 &
    pid=$!
    last=-1
    still=0
    n=0
    died=0
    while [ "$n" -lt 2400 ]; do
        n=$((n + 1))
        sleep 0.25
        if ! kill -0 "$pid" 2>/dev/null; then
            died=1
            break
        fi
        next=$(status_json | status_next_seq)
        [ -n "$next" ] || continue
        # Done when the stream holds every line, or nothing moved for 5 s (a spool reset
        # numbers records far above the line count).
        [ "$next" -gt "$ferry_total" ] && break
        if [ "$next" = "$last" ]; then still=$((still + 1)); else still=0; fi
        [ "$still" -ge 20 ] && break
        last=$next
    done
    if [ "$died" = 0 ]; then
        kill -TERM "$pid"
        w=0
        while kill -0 "$pid" 2>/dev/null && [ "$w" -lt 300 ]; do
            sleep 0.1
            w=$((w + 1))
        done
    fi
    wait "$pid"
    rc=$?
    echo "RESULT resume_rc=$rc resume_died=$died resume_panic=$(grep -c panicked /run/ferry2.log)"
    grep -iE 'panicked|corrupt|error' /run/ferry2.log | head -n 5
    "$F" spool export --config "$C" --stream "$STREAM" 2>/run/export2.err | check_export final
    echo "RESULT export2_rc=$? export2_panic=$(grep -c panicked /run/export2.err)"
    echo "RESULT aside_after=$(ls -d /data/spool.corrupt-* 2>/dev/null | wc -l)"
    # Why a spool was moved aside (or what else was reported lost).
    "$F" spool export --config "$C" --stream ferry.loss 2>/dev/null | head -n 3 | cut -c 1-600 | sed 's/^/LOSS /'
}

job_control() {
    # First a file that is synced (it must survive), then two writes that are not flushed.
    echo "synced $ferry_token" >/data/control-synced.txt
    sync
    echo "buffered $ferry_token" >/data/control-buffered.txt
    # Overwrite the first block of a pre-written file with O_DIRECT: it reaches the disk (past
    # the guest's page cache) but no cache flush is sent.
    printf 'direct %s\n' "$ferry_token" | dd of=/data/control-direct.bin bs=4096 count=1 \
        conv=notrunc,sync oflag=direct status=none
    echo "CONTROL-WRITTEN"
    sleep 600
}

job_control_check() {
    b=$(grep -c "buffered $ferry_token" /data/control-buffered.txt 2>/dev/null)
    d=$(head -c 4096 /data/control-direct.bin | grep -ac "direct $ferry_token")
    s=$(grep -c "synced $ferry_token" /data/control-synced.txt 2>/dev/null)
    echo "RESULT control_buffered=${b:-0} control_direct=${d:-0} control_synced=${s:-0}"
}

case "${ferry_job:-}" in
ingest) job_ingest ;;
check) job_check ;;
control) job_control ;;
control_check) job_control_check ;;
*) echo "guest.sh: unknown ferry_job '${ferry_job:-}'" ;;
esac
