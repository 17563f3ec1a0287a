#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind (not part of bench/run.sh or CI). Unlike
# wall-clock A/B runs on this shared machine, the count hardly moves between runs (about ±1%:
# how many events one loop turn handles still varies), so a change of a few percent shows.
#
#   bench/experiments/callgrind.sh NAME BINARY            # the agent (`run`), as in ab.sh
#   bench/experiments/callgrind.sh NAME raw:BINARY        # another proxy: BINARY LISTEN UPSTREAM BEARER
#   CONC=128 VGX="--separate-callers4=_rjem_je_tcache_alloc_small_hard" bench/experiments/callgrind.sh ...
#   AGENT_ENV="BEHEST_AGENT__PROXY__MAX_REPLAY_BODY=0" bench/experiments/callgrind.sh ...  # agent settings
#
# Starts the bench IdP and nginx upstream, the proxy under valgrind, warms it up with wrk, zeroes
# the counters, runs wrk for 10 s (CONC connections, 16 by default), dumps, and prints the
# instructions per request. The profile is /tmp/callgrind-NAME.out.1: `callgrind_annotate
# --inclusive=yes --tree=calling` on it shows where they go.
set -euo pipefail
B=$(cd "$(dirname "$0")/.." && pwd)
NAME=$1 BIN=$2
T=$(mktemp -d /tmp/behest-cg.XXXXXX)
PIDS=()
cleanup() { local p; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$T"; }
trap cleanup EXIT
BASE=${BASE_PORT:-19700}
IDP=$BASE UP=$((BASE + 1)) SINK=$((BASE + 8)) AG=$((BASE + 30))
node "$B/idp.js" --port "$IDP" --client-id c --secret s --audience aud >"$T/idp.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$IDP/.well-known/jwks.json" && break; sleep 0.1; done
TOKEN=$(curl -sf -X POST "http://127.0.0.1:$IDP/admin/issue" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
sed -e "s|@TMP@|$T|g" -e "s|@UPSTREAM_PORT@|$UP|g" -e "s|@SINK_PORT@|$SINK|g" -e "s|@SSE_PORT@|$((BASE + 2))|g" \
    "$B/nginx-upstream.conf.in" >"$T/up.conf"
nginx -p "$T" -e "$T/up.err" -c "$T/up.conf" &
PIDS+=($!)
OUT=/tmp/callgrind-$NAME.out
rm -f "$OUT" "$OUT".*
# shellcheck disable=SC2086 # VGX is a list of valgrind options
VG=(valgrind --tool=callgrind "--callgrind-out-file=$OUT" --dump-instr=no ${VGX:-})
if [[ $BIN == raw:* ]]; then
    "${VG[@]}" "${BIN#raw:}" "127.0.0.1:$AG" "127.0.0.1:$UP" "$TOKEN" >"$T/proxy.log" 2>&1 &
else
    env ${AGENT_ENV:-} BEHEST_AGENT__AUTH__DOMAIN="http://127.0.0.1:$IDP" BEHEST_AGENT__AUTH__AUDIENCE=aud \
        BEHEST_AGENT__AUTH__CLIENT_ID=c BEHEST_AGENT_CLIENT_SECRET=s BEHEST_AGENT__TOKEN__CACHE_FILE= \
        BEHEST_AGENT__CONTROL__SOCKET="$T/agent.sock" BEHEST_AGENT__PROXY__LISTEN="127.0.0.1:$AG" \
        BEHEST_AGENT__PROXY__UPSTREAM="http://127.0.0.1:$UP" BEHEST_AGENT__PROXY__ALLOW_INSECURE_UPSTREAM=true \
        BEHEST_AGENT_CONFIG=/dev/null "${VG[@]}" "$BIN" --log-level warn run >"$T/proxy.log" 2>&1 &
fi
PP=$!
PIDS+=("$PP")
for _ in $(seq 150); do
    curl -sf -o /dev/null -X POST -d '{}' "http://127.0.0.1:$AG/v1/chat/completions" && break
    sleep 0.2
done
load() { BENCH_METHOD=POST BENCH_BODY=small BENCH_AUTH="Bearer placeholder" wrk -t1 -c"${CONC:-16}" -d"$1" \
    -s "$B/wrk_report.lua" "http://127.0.0.1:$AG/v1/chat/completions"; }
load 3s >/dev/null
callgrind_control -z "$PP" >/dev/null 2>&1
N=$(load 10s | grep '^WRKJSON ' | cut -d' ' -f2- | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])')
callgrind_control -d "$PP" >/dev/null 2>&1
TOTAL=$(callgrind_annotate "$OUT.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "$NAME: $N requests, $((TOTAL / N)) instructions per request ($OUT.1)"
