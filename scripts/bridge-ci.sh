#!/usr/bin/env bash
# The NATS bridge's tests (bridge/, crate worker-events-bridge) against a real nats-server.
# Called from .ci/run. With CI=true a missing nats-server is installed from the distribution
# (Debian's package, 2.9.x, which the bridge's async-nats features are chosen for); without
# CI it is an error to be fixed by hand (apt-get install nats-server).
# The tests start their own server per test on a free loopback port with a temporary store.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
    if [ "${CI:-}" = "true" ]; then
        echo "bridge-ci: installing nats-server (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        SUDO=""
        if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then
            SUDO="sudo -E"
        fi
        $SUDO apt-get install -y -qq nats-server >/dev/null 2>&1 \
            || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq nats-server >/dev/null; }
    else
        echo "bridge-ci: nats-server is not installed (apt-get install nats-server)" >&2
        exit 1
    fi
fi
PATH="$PATH:/usr/sbin"
nats-server --version

# Unit tests, doc tests and the two-host tests (real processes, real server): built first,
# then run under a 5-minute bound (they take ~20 s).
cargo test -p worker-events-bridge --no-run
timeout 300 cargo test -p worker-events-bridge
