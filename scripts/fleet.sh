#!/usr/bin/env bash
# Fleet simulation for `ferry consume` (a manual run, not CI; figures go to docs/SCALING.md).
#
# AGENTS real ferry agents (distinct device ids; a system collector and a file collector each;
# CBOR + zstd) publish to one local Mosquitto; 3 consumers share the subscription
# ($share/fleet/...) and one state directory. During the run agents are SIGKILLed and
# restarted, and one consumer is SIGKILLed and restarted. Then every agent is stopped, its
# spool drained by a run without collectors, and each stream's committed seqs (next_seq - 1,
# from `ferry status --json`) are checked against the union of the consumers' outputs:
# exactly once each, and no gap reported.
#
# Usage: scripts/fleet.sh            (env: AGENTS=50 DURATION_S=60 LINES_PER_S=10
#                                      FERRY=target/release/ferry KEEP=1 to keep the work dir)
# Needs mosquitto, mosquitto-clients, python3. Everything listens on 127.0.0.1 only.
set -euo pipefail

AGENTS=${AGENTS:-50}
DURATION_S=${DURATION_S:-60}
LINES_PER_S=${LINES_PER_S:-10}
FERRY=$(realpath "${FERRY:-target/release/ferry}")
CONSUMERS=3
HZ=$(getconf CLK_TCK)

work=$(mktemp -d /tmp/ferry-fleet.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ -z "${KEEP:-}" ]]; then rm -rf "$work"; else echo "work dir kept: $work"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
wait_for() { # wait_for SECONDS COMMAND...
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do
        ((SECONDS < deadline)) || { echo "timed out: $*" >&2; return 1; }
        sleep 0.2
    done
}

port=$(free_port)
cat >"$work/mosquitto.conf" <<CONF
user root
listener $port 127.0.0.1
allow_anonymous true
max_queued_messages 0
log_dest file $work/mosquitto.log
CONF
mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 &
broker=$!; pids+=("$broker")
wait_for 10 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null

# Payload bytes on the data topics, as a subscriber sees them.
mosquitto_sub -h 127.0.0.1 -p "$port" -q 1 -t 'ferry/+/data/#' -F '%l' >"$work/sizes.txt" &
pids+=("$!")

declare -A consumer_pid
consumer_cpu=0
start_consumer() {
    local i=$1
    RUST_LOG=warn,ferry=info "$FERRY" consume --broker "127.0.0.1:$port" --state "$work/state" \
        --share fleet --client-id "fleet-c$i" --format jsonl \
        >>"$work/c$i.out" 2>>"$work/c$i.log" &
    consumer_pid[$i]=$!; pids+=("$!")
}
subscribed() { (($(cat "$work/c$1.log" 2>/dev/null | grep -c 'Subscribed.' || true) >= $2)); }
for i in $(seq 1 $CONSUMERS); do start_consumer "$i"; done
for i in $(seq 1 $CONSUMERS); do wait_for 30 subscribed "$i" 2; done

agent_config() { # agent_config N COLLECTORS_YAML
    local d="$work/a$1"
    cat <<YAML
device_id: dev-$(printf %03d "$1")
log_level: info
spool:
  dir: $d/spool
  max_bytes: 67108864
  flush_interval_ms: 200
uplink:
  host: 127.0.0.1
  port: $port
  client_id: ferry-dev-$1
  encoding: cbor
  compression: zstd
  batch: {max_records: 500, max_bytes: 65536, linger_ms: 1000}
  backoff: {initial_ms: 200, max_ms: 2000, reset_after_ms: 5000}
$2
YAML
}
declare -A agent_pid
start_agent() {
    "$FERRY" run --config "$work/a$1/ferry.yaml" >>"$work/a$1/ferry.log" 2>&1 &
    agent_pid[$1]=$!; pids+=("$!")
}
for i in $(seq 1 "$AGENTS"); do
    mkdir -p "$work/a$i"
    : >"$work/a$i/app.log"
    agent_config "$i" "collectors:
  - {type: system, name: system, interval_ms: 1000}
  - {type: file, name: app, path: $work/a$i/app.log, start_at: beginning}" >"$work/a$i/ferry.yaml"
    start_agent "$i"
done

# Applications writing their logs.
python3 - "$work" "$AGENTS" "$LINES_PER_S" "$DURATION_S" <<'PY' &
import sys, time
work, n, rate, duration = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
files = [open(f"{work}/a{i}/app.log", "a", buffering=1) for i in range(1, n + 1)]
start, k = time.time(), 0
while time.time() - start < duration:
    for i, f in enumerate(files):
        f.write(f"app {i + 1} line {k} level=info took_ms={k % 97}\n")
    k += 1
    time.sleep(max(0.0, start + k / rate - time.time()))
PY
writer=$!; pids+=("$writer")

t0=$(date +%s.%N)
broker_t0=$(cpu_ticks "$broker")
declare -A consumer_t0
for i in $(seq 1 $CONSUMERS); do consumer_t0[$i]=$(cpu_ticks "${consumer_pid[$i]}"); done
kills=0
end=$((SECONDS + DURATION_S))
killed_consumer=0
while ((SECONDS < end)); do
    sleep 1
    i=$((RANDOM % AGENTS + 1))
    kill -9 "${agent_pid[$i]}" 2>/dev/null && kills=$((kills + 1))
    wait "${agent_pid[$i]}" 2>/dev/null || true
    start_agent "$i"
    if ((killed_consumer == 0 && SECONDS > end - DURATION_S / 2)); then
        c=${consumer_pid[1]}
        consumer_cpu=$((consumer_cpu + $(cpu_ticks "$c") - consumer_t0[1]))
        kill -9 "$c"; wait "$c" 2>/dev/null || true
        sleep 2
        start_consumer 1; consumer_t0[1]=$(cpu_ticks "${consumer_pid[1]}")
        killed_consumer=1
    fi
done
wait "$writer" || true
t1=$(date +%s.%N)
broker_cpu=$(($(cpu_ticks "$broker") - broker_t0))
for i in $(seq 1 $CONSUMERS); do consumer_cpu=$((consumer_cpu + $(cpu_ticks "${consumer_pid[$i]}") - consumer_t0[$i])); done

# Stop every agent, then drain each spool with a run without collectors and note next_seq.
for i in $(seq 1 "$AGENTS"); do kill -TERM "${agent_pid[$i]}" 2>/dev/null || true; done
for i in $(seq 1 "$AGENTS"); do wait "${agent_pid[$i]}" 2>/dev/null || true; done
for i in $(seq 1 "$AGENTS"); do
    cp "$work/a$i/ferry.yaml" "$work/a$i/run.yaml"
    agent_config "$i" "collectors: []" >"$work/a$i/ferry.yaml"
    start_agent "$i"
done
drained() {
    "$FERRY" status --json --config "$work/a$1/ferry.yaml" >"$work/a$1/status.json" 2>/dev/null &&
        python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); sys.exit(any(x["records"] for x in s["spool"]["streams"] if not x["name"].startswith("ferry.")))' "$work/a$1/status.json"
}
for i in $(seq 1 "$AGENTS"); do wait_for 120 drained "$i"; done
for i in $(seq 1 "$AGENTS"); do kill -TERM "${agent_pid[$i]}"; wait "${agent_pid[$i]}" 2>/dev/null || true; done

# Wait until the outputs hold every committed record (or 120 s), then stop the consumers.
check() { python3 - "$work" "$AGENTS" "$CONSUMERS" "$1" <<'PY'
import collections, glob, json, sys
work, n, consumers, final = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "final"
committed = {}
for i in range(1, n + 1):
    s = json.load(open(f"{work}/a{i}/status.json"))
    for st in s["spool"]["streams"]:
        if not st["name"].startswith("ferry."):
            committed[(s["device"], st["name"])] = st["next_seq"] - 1
seen, gaps, losses, lines = collections.Counter(), 0, 0, 0
for c in range(1, consumers + 1):
    for line in open(f"{work}/c{c}.out"):
        r = json.loads(line)
        lines += 1
        t = r.get("type")
        if t == "gap": gaps += 1
        elif t == "loss": losses += 1
        elif t is None: seen[(r["device"], r["stream"], r["seq"])] += 1
missing = sum(1 for (d, s), m in committed.items() for q in range(1, m + 1) if (d, s, q) not in seen)
dups = sum(v - 1 for v in seen.values() if v > 1)
extra = sum(1 for (d, s, q) in seen if not 1 <= q <= committed.get((d, s), 0) and not s.startswith("ferry."))
if not final:
    sys.exit(0 if missing == 0 else 1)
total = sum(committed.values())
print(f"committed records: {total} in {len(committed)} streams")
print(f"output: missing {missing}, duplicated {dups}, unknown {extra}, gaps {gaps}, losses {losses}")
sys.exit(0 if missing == dups == extra == gaps == 0 else 1)
PY
}
wait_for 120 check wait || true
for i in $(seq 1 $CONSUMERS); do kill -TERM "${consumer_pid[$i]}"; wait "${consumer_pid[$i]}" 2>/dev/null || true; done

wall=$(python3 -c "print($t1 - $t0)")
ok=0; check final || ok=$?
python3 - "$work" "$CONSUMERS" "$wall" "$broker_cpu" "$consumer_cpu" "$HZ" "$AGENTS" "$kills" <<'PY'
import json, re, sys
work, consumers, wall, broker, consumer, hz, agents, kills = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7], sys.argv[8]
# Counters: the last counters line of each consumer run (a SIGKILLed run's last periodic line).
dups = records = messages = 0
for c in range(1, consumers + 1):
    for run in open(f"{work}/c{c}.log").read().split("Consumer starting.")[1:]:
        lines = [l for l in run.splitlines() if "Consumer counters." in l or "Consumer stopped." in l]
        if lines:
            f = dict(re.findall(r" (\w+)=(\d+)", lines[-1]))
            dups += int(f["duplicates"]); records += int(f["records"]); messages += int(f["messages"])
sizes = [int(l) for l in open(f"{work}/sizes.txt") if l.strip()]
committed = 0
for i in range(1, int(agents) + 1):
    s = json.load(open(f"{work}/a{i}/status.json"))
    committed += sum(st["next_seq"] - 1 for st in s["spool"]["streams"] if not st["name"].startswith("ferry."))
rate = committed / wall
print(f"agents {agents}, agent SIGKILLs {kills}, consumer SIGKILLs 1, run {wall:.0f} s")
print(f"records committed during the run {committed} ({rate:.0f} records/s); consumers output {records} records from {messages} messages, dropped {dups} duplicates")
print(f"payload bytes per message {sum(sizes) / max(1, len(sizes)):.0f} (mean of {len(sizes)})")
print(f"broker CPU {broker / hz / wall * 100:.1f}% of a core; consumers CPU {consumer / hz / wall * 100:.1f}% of a core in total")
print(f"consumer CPU per 1000 records/s: {consumer / hz / wall / (rate / 1000) * 100:.1f}% of a core")
PY
exit $ok
