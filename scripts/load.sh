#!/usr/bin/env bash
# The cost of the event bus on a proxy's own latency (issue 12 item 5).
#
# Runs examples/prefork_proxy.rs (release) under HTTP load from `wrk` (GET /cache/k, a cache
# hit), first without events, then with a background stream of cache updates published by
# worker 0 to all workers (`--stream-rate R`, R events/s), and prints requests/s and latency
# p50/p99 for each case, with ratios against the no-stream case of the same run.
#
# Usage: scripts/load.sh            (env: WORKERS=2 DURATION=10s THREADS=2 CONNS=32
#                                         RATES="1000 50000")
# Installs wrk with apt-get when missing (through sudo when not root).
set -euo pipefail
cd "$(dirname "$0")/.."

WORKERS=${WORKERS:-2}
DURATION=${DURATION:-10s}
THREADS=${THREADS:-2}
CONNS=${CONNS:-32}
RATES=${RATES:-"1000 50000"}

if ! command -v wrk >/dev/null; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || { echo "wrk is missing and sudo is not available" >&2; exit 1; }
        SUDO=sudo
    fi
    $SUDO apt-get install -y wrk >/dev/null || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y wrk >/dev/null; }
fi
command -v curl >/dev/null || { echo "curl is needed" >&2; exit 1; }

cargo build --release --features tokio --example prefork_proxy >&2
BIN=target/release/examples/prefork_proxy
TMP=$(mktemp -d)
MASTER=""
cleanup() {
    if [ -n "$MASTER" ]; then kill -TERM "$MASTER" 2>/dev/null || true; wait "$MASTER" 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT

# `/stats` of worker $2 at $1 (new connections until that worker answers).
stats_of() {
    local i
    for i in $(seq 200); do
        local s
        s=$(curl -s "http://$1/stats")
        if [[ $s == "{\"worker\":$2,"* ]]; then echo "$s"; return; fi
    done
    echo "{}"
}
field() { sed -n "s/.*\"$2\":\([0-9]*\).*/\1/p" <<<"$1" | head -1; }
# wrk's latency ("312.45us", "1.23ms", "2.01s") in ms.
to_ms() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n = n; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'; }

run_case() { # $1: stream rate (0: none)
    local rate=$1
    "$BIN" --workers "$WORKERS" --listen 127.0.0.1:0 --stream-rate "$rate" >"$TMP/out" 2>"$TMP/err" &
    MASTER=$!
    local addr=""
    for _ in $(seq 300); do
        addr=$(sed -n 's/^listening on \(.*\) with .*/\1/p' "$TMP/out")
        [ -n "$addr" ] && break
        sleep 0.1
    done
    [ -n "$addr" ] || { cat "$TMP/err" >&2; echo "the proxy did not start" >&2; exit 1; }
    curl -s -X PUT --data "value-of-k" "http://$addr/cache/k" >/dev/null
    sleep 1 # let the stream reach its pace
    local before after
    before=$(field "$(stats_of "$addr" 0)" published)
    local t0 t1
    t0=$(date +%s.%N)
    wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "http://$addr/cache/k" >"$TMP/wrk"
    t1=$(date +%s.%N)
    after=$(field "$(stats_of "$addr" 0)" published)
    local lost=0 w
    for w in $(seq 0 $((WORKERS - 1))); do
        lost=$((lost + $(field "$(stats_of "$addr" "$w")" lost)))
    done
    kill -TERM "$MASTER"
    wait "$MASTER" || { echo "proxy exit status $?" >&2; exit 1; }
    MASTER=""
    local rps p50 p99 errors evs
    rps=$(awk '/^Requests\/sec:/ { print $2 }' "$TMP/wrk")
    p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$TMP/wrk")")
    p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$TMP/wrk")")
    errors=$(awk '/Non-2xx|Socket errors/ { e = e $0 } END { print (e == "" ? "none" : e) }' "$TMP/wrk")
    evs=$(awk -v a="$after" -v b="$before" -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.0f", (a - b) / (t1 - t0) }')
    echo "$rate $rps $p50 $p99 $evs $lost $errors"
}

echo "prefork_proxy: $WORKERS workers; wrk -t$THREADS -c$CONNS -d$DURATION GET /cache/k; $(nproc) CPUs" >&2
results=()
for rate in 0 $RATES; do
    echo "case: stream $rate events/s" >&2
    results+=("$(run_case "$rate")")
done

base_rps=$(cut -d' ' -f2 <<<"${results[0]}")
base_p50=$(cut -d' ' -f3 <<<"${results[0]}")
base_p99=$(cut -d' ' -f4 <<<"${results[0]}")
printf '| %-22s | %10s | %6s | %10s | %6s | %10s | %6s | %14s | %5s |\n' \
    "background events/s" "requests/s" "ratio" "p50 ms" "ratio" "p99 ms" "ratio" "events/s done" "lost"
printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' "------------------------" "------------:" "-------:" "------------:" \
    "-------:" "------------:" "-------:" "----------------:" "------:"
for r in "${results[@]}"; do
    read -r rate rps p50 p99 evs lost errors <<<"$r"
    label=$([ "$rate" = 0 ] && echo "none" || echo "$rate")
    printf '| %-22s | %10s | %6s | %10s | %6s | %10s | %6s | %14s | %5s |\n' "$label" "$rps" \
        "$(awk -v a="$rps" -v b="$base_rps" 'BEGIN { printf "%.2f", a / b }')" "$p50" \
        "$(awk -v a="$p50" -v b="$base_p50" 'BEGIN { printf "%.2f", a / b }')" "$p99" \
        "$(awk -v a="$p99" -v b="$base_p99" 'BEGIN { printf "%.2f", a / b }')" "$evs" "$lost"
    [ "$errors" = none ] || echo "  wrk errors at $label: $errors" >&2
done
