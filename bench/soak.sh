#!/usr/bin/env bash
# Soak: mixed streaming and non-streaming traffic through `behest-agent dev` (embedded IdP and echo
# upstream) with 60 s tokens, so dozens of refreshes happen under load. Not part of CI.
#
#   bench/soak.sh                      # 30 minutes
#   SOAK_SECONDS=120 bench/soak.sh     # a shorter run
#
# Reports requests, errors (must be 0), grants, and the agent's RSS at start and end.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN=${SOAK_SECONDS:-1800}
WORKERS=${SOAK_WORKERS:-16}
TARGET=${CARGO_TARGET_DIR:-target}
if [ -n "${BEHEST_AGENT_BIN:-}" ]; then BIN=$BEHEST_AGENT_BIN; else
  cargo build --release --quiet
  BIN="$TARGET/release/behest-agent"
fi
tmp=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$tmp"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sock="$tmp/agent.sock"
"$BIN" dev --listen "127.0.0.1:$port" --token-ttl 60s --set "control.socket=$sock" --log-level warn >"$tmp/dev.log" 2>&1 &
pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
rss() { awk '/VmRSS/ {print $2" kB"}' "/proc/$pid/status"; }
status() { BEHEST_AGENT__CONTROL__SOCKET="$sock" "$BIN" status --json; }
grants() { status | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"]["grants_ok"])'; }
# Warm up, then measure.
python3 bench/soak.py "http://127.0.0.1:$port/v1" 5 "$WORKERS" >/dev/null
rss_start=$(rss); grants_start=$(grants)
echo "soak: ${SECONDS_TO_RUN}s, $WORKERS workers, 60 s tokens; agent pid $pid, RSS at start $rss_start"
result=$(python3 bench/soak.py "http://127.0.0.1:$port/v1" "$SECONDS_TO_RUN" "$WORKERS")
rss_end=$(rss); grants_end=$(grants)
echo "result: $result"
echo "grants during the run: $((grants_end - grants_start))"
echo "RSS: start $rss_start, end $rss_end"
errors=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["errors"])' "$result")
if [ "$errors" != "0" ]; then echo "FAIL: $errors errors"; exit 1; fi
echo "OK: no errors"
