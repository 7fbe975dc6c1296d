#!/usr/bin/env bash
# Soak test of worker-events (examples/soak.rs): real worker processes streaming events at a
# paced rate while RSS, open descriptors and queue depths are sampled; fails when RSS grows,
# a descriptor leaks, a queue keeps growing or an event is lost (see the example's docs).
#
#   scripts/soak.sh                 the manual soak: 10 minutes at 50,000 events/s, 4 workers
#   scripts/soak.sh --ci            the CI version: the same checks over 30 seconds
#   scripts/soak.sh [--ci] ARGS...  extra arguments go to the example (they override the
#                                   defaults), e.g. --seconds 180 or --transport socket
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

args=()
if [ "${1:-}" = "--ci" ]; then
    shift
    args=(--seconds 30)
fi
exec cargo run --release --example soak -- "${args[@]}" "$@"
