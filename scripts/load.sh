#!/usr/bin/env bash
# The cost of the event bus on a proxy's own latency (issue 12 item 5).
#
# Runs examples/prefork_proxy.rs (release) under HTTP load from `wrk` (GET /cache/k, a cache
# hit), first without events, then with a background stream of cache updates published by
# worker 0 to all workers (`--stream-rate R`, R events/s), and prints requests/s and latency
# p50/p99 for each case, with ratios against the no-stream case of the same run.
#
# Usage: scripts/load.sh   (env: WORKERS=2 DURATION=10s THREADS=2 CONNS=32 RATES="1000 50000"
#                                REPEAT=1: rounds of all cases, interleaved; the table shows
#                                medians, the lost column the sum over rounds)
# Installs wrk with apt-get when missing (through sudo when not root).
set -euo pipefail
cd "$(dirname "$0")/.."

WORKERS=${WORKERS:-2}
DURATION=${DURATION:-10s}
THREADS=${THREADS:-2}
CONNS=${CONNS:-32}
RATES=${RATES:-"1000 50000"}
REPEAT=${REPEAT:-1}

if ! command -v wrk >/dev/null; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || { echo "wrk is missing and sudo is not available" >&2; exit 1; }
        SUDO=sudo
    fi
    $SUDO apt-get install -y wrk >/dev/null || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y wrk >/dev/null; }
fi
command -v curl >/dev/null || { echo "curl is needed" >&2; exit 1; }

cargo build --release --features "tokio metrics" --example prefork_proxy >&2
BIN=target/release/examples/prefork_proxy
TMP=$(mktemp -d)
# run_case runs in a $(...) subshell: the running proxy's pid is kept in a file for cleanup.
cleanup() {
    local pid
    pid=$(cat "$TMP/master.pid" 2>/dev/null || true)
    if [ -n "$pid" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
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
    local out="$TMP/out-$rate" err="$TMP/err-$rate"
    : >"$out" # exists, empty, before the proxy starts writing to it
    "$BIN" --workers "$WORKERS" --listen 127.0.0.1:0 --stream-rate "$rate" >>"$out" 2>"$err" &
    MASTER=$!
    echo "$MASTER" >"$TMP/master.pid"
    local addr=""
    for _ in $(seq 300); do
        addr=$(sed -n 's/^listening on \(.*\) with .*/\1/p' "$out")
        [ -n "$addr" ] && break
        sleep 0.1
    done
    [ -n "$addr" ] || { cat "$err" >&2; echo "the proxy did not start" >&2; exit 1; }
    curl -s -X PUT --data "value-of-k" "http://$addr/cache/k" >/dev/null
    sleep 1 # let the stream reach its pace (and k reach every worker behind it)
    local before after
    before=$(field "$(stats_of "$addr" 0)" published)
    local t0 t1
    t0=$(date +%s.%N)
    wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "http://$addr/cache/k" >"$TMP/wrk"
    t1=$(date +%s.%N)
    after=$(field "$(stats_of "$addr" 0)" published)
    local lost=0 w n
    for w in $(seq 0 $((WORKERS - 1))); do
        n=$(field "$(stats_of "$addr" "$w")" lost)
        lost=$((lost + ${n:-0}))
    done
    kill -TERM "$MASTER"
    wait "$MASTER" || { echo "proxy exit status $?" >&2; exit 1; }
    rm -f "$TMP/master.pid"
    local rps p50 p99 errors evs
    rps=$(awk '/^Requests\/sec:/ { print $2 }' "$TMP/wrk")
    p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$TMP/wrk")")
    p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$TMP/wrk")")
    errors=$(awk '/Non-2xx|Socket errors/ { e = e $0 } END { print (e == "" ? "none" : e) }' "$TMP/wrk")
    evs=$(awk -v a="$after" -v b="$before" -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.0f", (a - b) / (t1 - t0) }')
    echo "$rate $rps $p50 $p99 $evs $lost $errors"
}

echo "prefork_proxy: $WORKERS workers; wrk -t$THREADS -c$CONNS -d$DURATION GET /cache/k; $(nproc) CPUs;" \
    "$REPEAT rounds, cases interleaved; medians" >&2
declare -A runs
for round in $(seq "$REPEAT"); do
    for rate in 0 $RATES; do
        echo "round $round: stream $rate events/s" >&2
        runs[$rate]+="$(run_case "$rate")"$'\n'
    done
done
# Median of column $2 of the runs of rate $1.
median() { awk -v c="$2" 'NF { print $c }' <<<"${runs[$1]}" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

base_rps=$(median 0 2)
base_p50=$(median 0 3)
base_p99=$(median 0 4)
printf '| %-22s | %10s | %6s | %10s | %6s | %10s | %6s | %14s | %5s |\n' \
    "background events/s" "requests/s" "ratio" "p50 ms" "ratio" "p99 ms" "ratio" "events/s done" "lost"
sep() { printf '%*s' "$1" '' | tr ' ' -; }
echo "|$(sep 24)|$(sep 11):|$(sep 7):|$(sep 11):|$(sep 7):|$(sep 11):|$(sep 7):|$(sep 15):|$(sep 6):|"
for rate in 0 $RATES; do
    rps=$(median "$rate" 2)
    p50=$(median "$rate" 3)
    p99=$(median "$rate" 4)
    lost=$(awk 'NF { n += $6 } END { print n + 0 }' <<<"${runs[$rate]}")
    label=$([ "$rate" = 0 ] && echo "none" || echo "$rate")
    printf '| %-22s | %10s | %6s | %10s | %6s | %10s | %6s | %14s | %5s |\n' "$label" "$rps" "$(ratio "$rps" "$base_rps")" \
        "$p50" "$(ratio "$p50" "$base_p50")" "$p99" "$(ratio "$p99" "$base_p99")" "$(median "$rate" 5)" "$lost"
    awk -v l="$label" 'NF && $7 != "none" { $1 = $2 = $3 = $4 = $5 = $6 = ""; print "  wrk errors at " l ":" $0 }' \
        <<<"${runs[$rate]}" >&2
done
