#!/usr/bin/env bash
# Soak run: ferry (release build), fed by a file it tails and by system collectors, under a
# random, seeded mix of link cuts, blackholes, throttling, latency, SIGKILLs and graceful
# Mosquitto restarts for SECONDS (default 600), then one summary: records produced, delivered,
# lost (must be 0), duplicates, reconnects, max RSS, spool disk high-water mark. Exits non-zero
# if anything was lost or a line of the file was skipped or ingested twice.
#
# Not part of scripts/test. Needs mosquitto (scripts/test installs it). The driver is the
# ignored test in tests/soak.rs; see its module doc for the schedule.
#
#   tests/soak.sh [SECONDS]
#   SOAK_SEED=N          replay a fault schedule (the seed is printed)
#   SOAK_LINES_PER_S=N   lines per second appended to a file ferry tails (default 500; 0: none)
#   SOAK_COLLECTORS=N    system collectors at 200 ms (default 8, about 40 records/s)
#   SOAK_LOG=PATH        keep ferry's log (all its runs) there
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
