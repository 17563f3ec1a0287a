#!/usr/bin/env bash
# TCP segments per request through each proxy (not part of bench/run.sh or CI): the machine's
# InSegs/OutSegs (/proc/net/snmp) over a wrk run of small POSTs, divided by the requests. Each
# BINARY (an agent, or raw:PATH for another proxy started as `PATH LISTEN UPSTREAM BEARER`) runs
# in turn, each followed by nginx as the same proxy, on ab.sh's pinning. 4.0 means one segment
# per hop and direction, every ACK piggybacked.
#
#   CONC=128 bench/experiments/segments.sh target/release/behest-agent raw:/tmp/bare/target/release/bare-proxy
set -euo pipefail
B=$(cd "$(dirname "$0")/.." && pwd)
BASE=${BASE_PORT:-19600}
IDP=$BASE UP=$((BASE + 1)) NGX=$((BASE + 3)) SINK=$((BASE + 8)) PX=$((BASE + 50))
T=$(mktemp -d /tmp/behest-segs.XXXXXX)
PIDS=()
cleanup() { local p; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$T"; }
trap cleanup EXIT
wait_port() { local i; for ((i = 0; i < 200; i++)); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "no listener on $1" >&2; exit 1; }
node "$B/idp.js" --port "$IDP" --client-id c --secret s --audience aud >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$IDP"
TOKEN=$(curl -sf -X POST "http://127.0.0.1:$IDP/admin/issue" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
fill() { sed -e "s|@TMP@|$T|g" -e "s|@UPSTREAM_PORT@|$UP|g" -e "s|@SINK_PORT@|$SINK|g" -e "s|@SSE_PORT@|$((BASE + 2))|g" \
    -e "s|@NGINX_PORT@|$NGX|g" -e "s|@NGINX_SSE_PORT@|$((BASE + 4))|g" -e "s|@KEEPALIVE@|256|g" -e "s|@TOKEN@|$TOKEN|g" "$1" >"$2"; }
fill "$B/nginx-upstream.conf.in" "$T/up.conf"
fill "$B/nginx-proxy.conf.in" "$T/px.conf"
taskset -c 1 nginx -p "$T" -e "$T/up.err" -c "$T/up.conf" & PIDS+=($!)
taskset -c 1 nginx -p "$T" -e "$T/px.err" -c "$T/px.conf" & PIDS+=($!)
wait_port "$UP"
wait_port "$NGX"
segs() { awk '/^Tcp:/ && $2 ~ /^[0-9]/ {print $11, $12}' /proc/net/snmp; }
load() { # port seconds -> requests
    BENCH_METHOD=POST BENCH_BODY=small BENCH_AUTH="Bearer placeholder" taskset -c 0 wrk -t1 -c"${CONC:-128}" -d"$2s" \
        -s "$B/wrk_report.lua" "http://127.0.0.1:$1/v1/chat/completions" | sed -n 's/^WRKJSON //p' \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])'
}
measure() { # label port
    load "$2" 1 >/dev/null
    local in0 out0 in1 out1 n
    read -r in0 out0 < <(segs)
    n=$(load "$2" 3)
    read -r in1 out1 < <(segs)
    awk -v l="$1" -v i=$((in1 - in0)) -v o=$((out1 - out0)) -v n="$n" \
        'BEGIN { printf "%-50s %8d requests, %.2f segments in, %.2f out per request\n", l, n, i / n, o / n }'
}
for bin in "$@"; do
    if [[ $bin == raw:* ]]; then
        taskset -c 1 "${bin#raw:}" "127.0.0.1:$PX" "127.0.0.1:$UP" "$TOKEN" >"$T/px.log" 2>&1 &
    else
        taskset -c 1 env BEHEST_AGENT__AUTH__DOMAIN="http://127.0.0.1:$IDP" BEHEST_AGENT__AUTH__AUDIENCE=aud \
            BEHEST_AGENT__AUTH__CLIENT_ID=c BEHEST_AGENT_CLIENT_SECRET=s BEHEST_AGENT__TOKEN__CACHE_FILE= \
            BEHEST_AGENT__CONTROL__SOCKET="$T/agent.sock" BEHEST_AGENT__PROXY__LISTEN="127.0.0.1:$PX" \
            BEHEST_AGENT__PROXY__UPSTREAM="http://127.0.0.1:$UP" BEHEST_AGENT__PROXY__ALLOW_INSECURE_UPSTREAM=true \
            BEHEST_AGENT_CONFIG=/dev/null "$bin" --log-level error run >"$T/px.log" 2>&1 &
    fi
    pid=$!
    PIDS+=("$pid")
    wait_port "$PX"
    for _ in $(seq 100); do [[ $(curl -s -o /dev/null -w '%{http_code}' -X POST -d '{}' "http://127.0.0.1:$PX/v1/chat/completions") == 200 ]] && break; sleep 0.05; done
    measure "$bin" "$PX"
    measure nginx "$NGX"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
done
