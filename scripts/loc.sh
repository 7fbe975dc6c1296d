#!/usr/bin/env bash
# Code lines per file under src/: lines that are not blank and not comments (`//`, `///`,
# `//!`, block comments), with `#[cfg(test)]`/`#[cfg(all(test, ...))]` modules left out.
# Usage: scripts/loc.sh [max]   (with `max`, exits 1 if any file has more code lines)
set -euo pipefail
cd "$(dirname "$0")/.."
max="${1:-}"
status=0
total=0
while IFS= read -r f; do
  n=$(awk '
    BEGIN { skip = 0; depth = 0; pending = 0; inblock = 0 }
    {
      line = $0
      sub(/^[ \t]+/, "", line)
      if (inblock) { if (line ~ /\*\//) inblock = 0; next }
      if (line ~ /^\/\*/) { if (line !~ /\*\//) inblock = 1; next }
      if (skip) {
        o = gsub(/\{/, "{", line); c = gsub(/\}/, "}", line)
        depth += o - c
        if (depth <= 0 && started) { skip = 0 }
        if (o > 0) started = 1
        next
      }
      if (line ~ /^#\[cfg\((all\()?test/) { pending = 1; next }
      if (pending) {
        if (line ~ /^mod [A-Za-z_0-9]+ *\{/ || line ~ /^pub(\(crate\))? mod [A-Za-z_0-9]+ *\{/) {
          skip = 1; started = 0; depth = 0
          o = gsub(/\{/, "{", line); c = gsub(/\}/, "}", line); depth = o - c; started = 1
          if (depth <= 0) skip = 0
          pending = 0
          next
        }
        pending = 0
      }
      if (line == "" || line ~ /^\/\//) next
      n++
    }
    END { print n + 0 }' "$f")
  total=$((total + n))
  printf '%5d  %s\n' "$n" "$f"
  if [[ -n "$max" && "$n" -gt "$max" ]]; then status=1; fi
done < <(find src -name '*.rs' | sort)
printf '%5d  total\n' "$total"
exit "$status"
