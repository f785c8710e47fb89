#!/bin/sh
# Runs inside the systemd VM as /data/guest.sh, started by systemd (PID 1) through
# `systemd.run=` on the kernel command line (see systemd.sh). Installs the .deb and puts the
# shipped unit through what an operator relies on. Every check prints `RESULT key=value`;
# systemd.sh compares them with what they must be. The console is the serial port the host
# reads; the VM powers off when this script exits.
set -u
exec >/dev/console 2>&1
C=/etc/ferry/ferry.yaml
res() { echo "RESULT $*"; }
show() { systemctl show -P "$1" ferry; }
# journal_lines: the unit's journal (ferry's own lines and systemd's about the unit).
journal_lines() { journalctl -u ferry -o short-monotonic --no-pager 2>/dev/null; }
# wait_for SECONDS COMMAND...: polls COMMAND every 0.5 s; 0 once it succeeds.
wait_for() {
    n=$(($1 * 2))
    shift
    while [ "$n" -gt 0 ]; do
        "$@" && return 0
        n=$((n - 1))
        sleep 0.5
    done
    return 1
}
# records_of STREAM: the stored record count of STREAM in ferry's status (0 when absent).
records_of() {
    ferry status --config "$C" --json 2>/dev/null | tr '{' '\n' | grep "\"name\":\"$1\"" |
        sed -n 's/.*"next_seq":\([0-9]*\).*/\1/p' | head -n1
}
serial_flows() { [ "$(records_of vmserial)" -gt 1 ] 2>/dev/null; }

echo "GUEST-UP"
res pid1="$(cat /proc/1/comm)"
# The root image is attached with snapshot=on: writes go to a throwaway overlay.
mount -o remount,rw /

# --- install: dpkg configures, enables and starts the unit ----------------------------------
dpkg -i /data/ferry.deb >/tmp/dpkg.log 2>&1
rc=$?
res install="$rc"
[ "$rc" = 0 ] || sed 's/^/DPKG /' /tmp/dpkg.log
res enabled="$(systemctl is-enabled ferry)"
wait_for 120 systemctl is-active --quiet ferry
res active_after_install="$(systemctl is-active ferry)"
res user_groups="$(id -nG ferry | tr ' ' ',')"

# --- start reaches active only after READY=1 -------------------------------------------------
# A serial collector on the second serial port (root:dialout 0660, the host feeds it lines)
# as a drop-in, so the start below also shows the service user opens it.
mkdir -p /etc/ferry/ferry.d
cat >/etc/ferry/ferry.d/50-vmtest-serial.yaml <<'EOF'
collectors:
  - type: serial
    name: vmserial
    path: /dev/ttyS1
    baud: 115200
    format:
      type: kv
EOF
res ttyS1="$(stat -c %U:%G:%a /dev/ttyS1)"
systemctl stop ferry
res type="$(show Type)" watchdog_usec="$(show WatchdogUSec)"
# With PID 1 logging at debug, the journal shows the notification and the state change.
systemctl log-level debug
systemctl start ferry
res start_rc=$?
systemctl log-level info
res state_after_start="$(show ActiveState)/$(show SubState)"
ferry status --config "$C" --json >/dev/null 2>&1
res status_answers_after_start=$?
ready=$(journal_lines | grep -n 'ferry.service: Got notification message' | grep -m1 'READY=1' | cut -d: -f1)
running=$(journal_lines | grep -n 'ferry.service: Changed start -> running' | tail -n1 | cut -d: -f1)
res ready_line="${ready:-none}" running_line="${running:-none}"
if [ -n "$ready" ] && [ -n "$running" ] && [ "$ready" -lt "$running" ]; then
    res ready_before_running=1
else
    res ready_before_running=0
    journal_lines | grep -E 'notification|Changed' | tail -n 20 | sed 's/^/JOURNAL /'
fi

# --- the serial port of group dialout --------------------------------------------------------
wait_for 60 serial_flows
res serial_records_flowing=$?
res serial_next_seq="$(records_of vmserial)"
res permission_denied_lines="$(journal_lines | grep -ci 'permission denied')"

# --- reload: a good config applied, a bad one refused, the agent keeps running --------------
pid=$(show MainPID)
before=$(journal_lines | grep -c 'Config reloaded')
cat >/etc/ferry/ferry.d/60-vmtest-reload.yaml <<'EOF'
log_level: debug
EOF
systemctl reload ferry
res reload_good_rc=$?
wait_for 30 sh -c "[ \$(journalctl -u ferry --no-pager | grep -c 'Config reloaded') -gt $before ]"
res reload_good_applied=$?
res reload_good_same_pid="$([ "$(show MainPID)" = "$pid" ] && echo 1 || echo 0)"
printf 'log_level: [\n' >/etc/ferry/ferry.d/70-vmtest-bad.yaml
systemctl reload ferry 2>/tmp/reload-bad.err
res reload_bad_rc=$?
sed 's/^/RELOAD-BAD /' /tmp/reload-bad.err | head -n 5
sleep 2
res reload_bad_state="$(show ActiveState)" reload_bad_same_pid="$([ "$(show MainPID)" = "$pid" ] && echo 1 || echo 0)"
rm -f /etc/ferry/ferry.d/70-vmtest-bad.yaml /etc/ferry/ferry.d/60-vmtest-reload.yaml

# --- watchdog: a stopped (hung) agent is killed and restarted --------------------------------
restarts=$(show NRestarts)
kill -STOP "$pid"
new_pid() { p=$(show MainPID); [ "$p" != 0 ] && [ "$p" != "$pid" ] && systemctl is-active --quiet ferry; }
# WatchdogSec=60 plus RestartSec=10s, with room for a slow VM.
wait_for 240 new_pid
res watchdog_restarted=$?
res restarts_before="$restarts" restarts_after="$(show NRestarts)"
res watchdog_journal="$(journal_lines | grep -c 'Watchdog timeout')"
res old_pid_gone="$([ -d /proc/"$pid" ] && echo 0 || echo 1)"

# --- stop: clean, within the timeout ---------------------------------------------------------
t0=$(date +%s%N)
systemctl stop ferry
res stop_rc=$?
res stop_ms=$((($(date +%s%N) - t0) / 1000000))
res stop_result="$(show Result)" stop_exit_status="$(show ExecMainStatus)"
res stop_sigkill="$(journal_lines | tail -n 30 | grep -c 'Killing process.*SIGKILL')"

# --- the sandbox of the running unit ---------------------------------------------------------
systemctl start ferry
systemd-analyze security ferry --no-pager >/tmp/security.txt 2>&1
sed 's/^/SECURITY /' /tmp/security.txt
res exposure="$(sed -n 's/.*Overall exposure level for ferry.service: \([0-9.]*\).*/\1/p' /tmp/security.txt)"

journal_lines | tail -n 40 | sed 's/^/JOURNAL /'
systemctl stop ferry
echo "GUEST-DONE"
exit 0
