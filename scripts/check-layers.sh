#!/usr/bin/env bash
# Dependency and placement rules of src/ (see ARCHITECTURE.md). Each rule prints its
# violations; the script exits non-zero if any rule has one. Comment lines and
# `#[cfg(test)]` modules are left out (tests may poke at internals), except where noted.
set -uo pipefail
cd "$(dirname "$0")/.."
fail=0

# Non-comment, non-test lines of the given files, as `file:line:text`.
code() {
  for f in "$@"; do
    awk -v F="$f" '
      BEGIN { skip = 0; depth = 0; pending = 0 }
      {
        line = $0; t = line; sub(/^[ \t]+/, "", t)
        if (skip) {
          o = gsub(/\{/, "{", t); c = gsub(/\}/, "}", t); depth += o - c
          if (depth <= 0) skip = 0
          next
        }
        if (t ~ /^#\[cfg\((all\()?test/) { pending = 1; next }
        if (pending && t ~ /^(pub(\(crate\))? )?mod [A-Za-z_0-9]+ *\{/) {
          o = gsub(/\{/, "{", t); c = gsub(/\}/, "}", t); depth = o - c; skip = depth > 0; pending = 0; next
        }
        pending = 0
        if (t == "" || t ~ /^\/\//) next
        print F ":" NR ":" line
      }' "$f"
  done
}

# rule NAME: run the remaining command; its output is the list of violations.
rule() {
  local name="$1"; shift
  local out
  out="$("$@" 2>&1)"
  if [[ -n "$out" ]]; then
    echo "FAIL: $name"; echo "$out" | sed 's/^/    /'; fail=1
  else
    echo "ok:   $name"
  fi
}

all_src() { find src -name '*.rs' | sort; }
files_under() { find "$@" -name '*.rs' 2>/dev/null | sort; }

rule "nothing below the facade imports worker/ (the integrations tokio.rs, mio.rs and metrics.rs sit above it)" \
  bash -c "$(declare -f code files_under); code \$(find src -name '*.rs' ! -path 'src/worker/*' ! -name lib.rs ! -name tokio.rs ! -name mio.rs ! -name metrics.rs | sort) | grep -E 'crate::worker|super::worker'"
rule "the integrations (tokio.rs, mio.rs) use nothing of the crate but the facade and its errors" \
  bash -c "$(declare -f code); code \$(ls src/tokio.rs src/mio.rs 2>/dev/null) | grep -E 'crate::' | grep -vE 'crate::(worker::Worker|error::)'"
rule "metrics.rs reads nothing of the crate but the facade's Worker, Stats and Wid" \
  bash -c "$(declare -f code); code \$(ls src/metrics.rs 2>/dev/null) | grep -E 'crate::' | grep -vE 'crate::(worker::Worker|stats::\\{?(PeerStats, )?Stats\\}?|event::Wid);'"
rule "control/ never imports transport/ or worker/" \
  bash -c "$(declare -f code); code \$(find src/control -name '*.rs') | grep -E 'crate::(transport|worker)'"
rule "transport/ never imports control/ or worker/" \
  bash -c "$(declare -f code); code \$(find src/transport -name '*.rs') | grep -E 'crate::(control|worker)'"
rule "wire/ (below control and transport) imports neither" \
  bash -c "$(declare -f code); code \$(find src/wire -name '*.rs') | grep -E 'crate::(control|transport|worker)'"
rule "the layers below wire/ import nothing above them" \
  bash -c "$(declare -f code); code src/{sys,sync,layout,region,ring,notify,dedup,divert,message,event,error,stats,subs,options}.rs | grep -E 'crate::(control|transport|worker|wire)'"
rule "only sys.rs (and src/sys/) calls libc or nix (tests included)" \
  bash -c "grep -rnE '\\b(libc|nix)::' src --include='*.rs' | grep -vE '^src/sys(\\.rs|/[a-z_]+\\.rs):'"
rule "only region.rs and transport/shm.rs reach region/slot headers" \
  bash -c "$(declare -f code); code \$(find src -name '*.rs' | sort) | grep -E '\\.(header|slot)\\(' | grep -vE '^src/(region|transport/shm|fuzz_api)\\.rs:'"
rule "only layout.rs and region.rs name the header and slot words" \
  bash -c "$(declare -f code); code \$(find src -name '*.rs' | sort) | grep -E '\\.(ctl_pending|broker_epoch|broker_slot|broker_pid|generation|region_id|layout_version)\\b($|[^(a-z_])' | grep -vE '^src/(layout|region)\\.rs:'"
rule "every #[repr(C)] type is in layout.rs" \
  bash -c "grep -rnE '^[^/]*#\\[repr\\(C' src --include='*.rs' | grep -v '^src/layout.rs:'"
rule "layout.rs depends on no algorithm module" \
  bash -c "grep -nE 'crate::(dedup|ring|notify|region)' src/layout.rs"
rule "std atomics only in sync.rs (clippy.toml enforces it too)" \
  bash -c "grep -rn 'std::sync::atomic' src --include='*.rs' | grep -v '^src/sync.rs:'"
rule "clippy.toml disallows the std atomic types" \
  bash -c "grep -q 'std::sync::atomic::AtomicU64' clippy.toml || echo 'clippy.toml: disallowed-types missing'"
rule "no module below lib names a crate-root re-export (docs included)" \
  bash -c "grep -rnE 'crate::(Wid|Target|Event|Events|Worker|Error|PublishError|Result|Options|Transport|Stats|PeerStats|SubscriptionId|Lost|NewBroker|Payload|SYSTEM_SOURCE|MAX_UNIQUE_HASH_LEN|DEFAULT_RING_CAPACITY|MAX_PAYLOAD_LIMIT|MAX_WORKERS)\\b' src --include='*.rs' | grep -v '^src/lib.rs:'"
rule "no u32::MAX sentinel for the broker outside the inbox encoding" \
  bash -c "$(declare -f code); code \$(find src/control src/transport src/worker -name '*.rs') | grep -n 'u32::MAX' | grep -v 'n.min(u32::MAX'"
rule "src cites no DESIGN.md" \
  bash -c "grep -rn 'DESIGN.md' src"
rule "no file in src/ over 450 code lines" \
  bash -c "scripts/loc.sh 450 >/dev/null || scripts/loc.sh | awk '\$1 > 450 && \$2 != \"total\"'"

exit "$fail"
