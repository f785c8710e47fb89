#!/usr/bin/env bash
# Soak run: ferry (release build) under a random, seeded mix of link cuts, blackholes,
# throttling, latency, SIGKILLs and graceful Mosquitto restarts for SECONDS (default 600),
# then one summary: records produced, delivered, lost (must be 0), duplicates, reconnects,
# max RSS, spool disk high-water mark. Exits non-zero if anything was lost.
#
# Not part of scripts/test. Needs mosquitto (scripts/test installs it). The driver is the
# ignored test in tests/soak.rs; see its module doc for the schedule.
#
#   tests/soak.sh [SECONDS]
#   SOAK_SEED=N          replay a fault schedule (the seed is printed)
#   SOAK_COLLECTORS=N    system collectors at 200 ms (default 8, about 40 records/s)
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-600}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || ((secs == 0)); then
    echo "usage: $0 [SECONDS]" >&2
    exit 2
fi
if ! command -v mosquitto >/dev/null; then
    echo "mosquitto is not installed: apt-get install -y mosquitto mosquitto-clients" >&2
    exit 1
fi

echo "building the release binary and the soak driver..."
cargo test --release --test soak --no-run
SOAK_SECS="$secs" exec cargo test --release --test soak -- --ignored --nocapture --test-threads 1
