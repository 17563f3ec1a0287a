#!/usr/bin/env bash
# A/B harness for hot-path experiments (not part of bench/run.sh, not part of CI): several agent
# builds or settings, and nginx as the reference, against one nginx upstream, interleaved, with the
# proxies' user and system CPU per request from /proc, and their context switches per 1,000
# requests (voluntary: the proxy had nothing to do and slept in epoll_wait; involuntary: it was
# preempted, mostly by the upstream it shares a core with). Also the upstream nginx's CPU per
# request and its switches behind each proxy (its voluntary switches are its wake-ups), each
# core's idle share, wrk's p50 and p90, and the proxies' minor page faults per 1,000 requests.
# Same pinning as bench/run.sh on 2 cores:
# wrk on CPU 0; the proxies and the upstream on CPU 1.
#
#   bench/experiments/ab.sh ROUNDS CONCURRENCY "LABEL=BINARY[;ENV=VALUE...]" ...
#
# Knobs (environment): DUR (seconds per wrk run, 3), BODY (small | 1MiB | none, small), URLPATH
# (/v1/chat/completions; /v1/files for uploads the upstream reads whole), BASE_PORT (19800),
# UPCPU (the CPUs the upstream runs on, 1: with the proxies, as in bench/run.sh; 0 puts it beside wrk).
#
# A BINARY written `raw:PATH` is another proxy, started as `PATH LISTEN UPSTREAM BEARER` (host:port
# pairs and the bearer token), e.g. bench/experiments/bare-proxy.rs built as its header says.
#
# e.g. (with a second build of the agent carrying hotpath-switches.patch in /tmp/exp-target):
#   bench/experiments/ab.sh 6 128 "base=target/release/behest-agent" \
#       "current_thread=/tmp/exp-target/release/behest-agent;EXP=ct"
set -euo pipefail
B=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=$1 CONC=$2
shift 2
DUR=${DUR:-3}
BASE_PORT=${BASE_PORT:-19800}
T=$(mktemp -d /tmp/behest-ab.XXXXXX)
PIDS=()
cleanup() { local p; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$T"; }
trap cleanup EXIT
spawn() { local cpus=$1 logf=$2; shift 2; taskset -c "$cpus" "$@" >"$logf" 2>&1 </dev/null & SPAWNED=$!; PIDS+=("$SPAWNED"); }
wait_port() { local i; for ((i = 0; i < 200; i++)); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "no listener on $1" >&2; exit 1; }

IDP=$BASE_PORT UP=$((BASE_PORT + 1)) NGX=$((BASE_PORT + 3)) SINK=$((BASE_PORT + 8))
spawn 0 "$T/idp.log" node "$B/idp.js" --port "$IDP" --client-id c --secret s --audience aud
wait_port "$IDP"
TOKEN=$(curl -sf -X POST "http://127.0.0.1:$IDP/admin/issue" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
fill() { sed -e "s|@TMP@|$T|g" -e "s|@UPSTREAM_PORT@|$UP|g" -e "s|@SINK_PORT@|$SINK|g" -e "s|@SSE_PORT@|$((BASE_PORT + 2))|g" \
    -e "s|@NGINX_PORT@|$NGX|g" -e "s|@NGINX_SSE_PORT@|$((BASE_PORT + 4))|g" -e "s|@KEEPALIVE@|256|g" -e "s|@TOKEN@|$TOKEN|g" "$1" >"$2"; }
fill "$B/nginx-upstream.conf.in" "$T/up.conf"
fill "$B/nginx-proxy.conf.in" "$T/px.conf"
spawn "${UPCPU:-1}" "$T/up.out" nginx -p "$T" -e "$T/up.err" -c "$T/up.conf"
UM=$SPAWNED
spawn 1 "$T/px.out" nginx -p "$T" -e "$T/px.err" -c "$T/px.conf"
NM=$SPAWNED
wait_port "$UP"
wait_port "$NGX"

labels=() ports=() pids=()
port=$((BASE_PORT + 30))
for spec in "$@"; do
    label=${spec%%=*}
    IFS=';' read -ra parts <<<"${spec#*=}"
    bin=${parts[0]}
    if [[ $bin == raw:* ]]; then # another proxy: ARGS are its listen address, upstream, bearer
        spawn 1 "$T/agent-$port.log" env "${parts[@]:1}" "${bin#raw:}" "127.0.0.1:$port" "127.0.0.1:$UP" "$TOKEN"
        labels+=("$label") ports+=("$port") pids+=("$SPAWNED")
        wait_port "$port"
        port=$((port + 1))
        continue
    fi
    spawn 1 "$T/agent-$port.log" env "${parts[@]:1}" \
        BEHEST_AGENT__AUTH__DOMAIN="http://127.0.0.1:$IDP" BEHEST_AGENT__AUTH__AUDIENCE=aud \
        BEHEST_AGENT__AUTH__CLIENT_ID=c BEHEST_AGENT_CLIENT_SECRET=s BEHEST_AGENT__TOKEN__CACHE_FILE= \
        BEHEST_AGENT__CONTROL__SOCKET="$T/agent-$port.sock" BEHEST_AGENT__PROXY__LISTEN="127.0.0.1:$port" \
        BEHEST_AGENT__PROXY__UPSTREAM="http://127.0.0.1:$UP" BEHEST_AGENT__PROXY__ALLOW_INSECURE_UPSTREAM=true \
        BEHEST_AGENT_CONFIG=/dev/null "$bin" --log-level warn run
    labels+=("$label") ports+=("$port") pids+=("$SPAWNED")
    wait_port "$port"
    port=$((port + 1))
done
sleep 1
labels+=(nginx) ports+=("$NGX") pids+=("$NM $(pgrep -P "$NM" | tr '\n' ' ')")
for p in "${ports[@]}"; do
    [[ $(curl -s -o /dev/null -w '%{http_code}' -X POST -d '{}' "http://127.0.0.1:$p/v1/chat/completions") == 200 ]] \
        || { echo "port $p does not answer 200" >&2; exit 1; }
done
ticks() { local u=0 s=0 p a b; for p in "$@"; do read -r a b < <(awk '{print $14, $15}' "/proc/$p/stat"); u=$((u + a)); s=$((s + b)); done; echo "$u $s"; }
# minor page faults (the kernel handing the process a page it had given back or never touched)
faults() { local f=0 p a; for p in "$@"; do read -r a < <(awk '{print $10}' "/proc/$p/stat"); f=$((f + a)); done; echo "$f"; }
# idle CPU 0 and CPU 1 (ticks, /proc/stat: idle + iowait)
idle() { awk '/^cpu0 /{a=$5+$6} /^cpu1 /{b=$5+$6} END {print a, b}' /proc/stat; }
switches() { local v=0 n=0 p a b; for p in "$@"; do read -r a b < <(awk '/^voluntary_ctxt/ {a=$2} /^nonvoluntary_ctxt/ {b=$2} END {print a, b}' "/proc/$p/status"); v=$((v + a)); n=$((n + b)); done; echo "$v $n"; }
: >"$T/ab.jsonl"
n=${#labels[@]}
for ((r = 0; r < ROUNDS; r++)); do
    for ((k = 0; k < n; k++)); do
        i=$(((k + r) % n))
        read -r u0 s0 < <(ticks ${pids[$i]})
        read -r v0 n0 < <(switches ${pids[$i]})
        read -r f0 < <(faults ${pids[$i]})
        read -r uu0 us0 < <(ticks $UM $(pgrep -P "$UM"))
        read -r uv0 un0 < <(switches $UM $(pgrep -P "$UM"))
        read -r i00 i10 < <(idle)
        out=$(BENCH_METHOD=POST BENCH_BODY=${BODY:-small} BENCH_AUTH="Bearer placeholder" taskset -c 0 wrk -t1 -c"$CONC" -d"${DUR}s" \
            -s "$B/wrk_report.lua" "http://127.0.0.1:${ports[$i]}${URLPATH:-/v1/chat/completions}" | grep '^WRKJSON ' | cut -d' ' -f2-)
        read -r u1 s1 < <(ticks ${pids[$i]})
        read -r v1 n1 < <(switches ${pids[$i]})
        read -r f1 < <(faults ${pids[$i]})
        read -r uu1 us1 < <(ticks $UM $(pgrep -P "$UM"))
        read -r uv1 un1 < <(switches $UM $(pgrep -P "$UM"))
        read -r i01 i11 < <(idle)
        echo "{\"label\":\"${labels[$i]}\",\"u\":$((u1 - u0)),\"s\":$((s1 - s0)),\"v\":$((v1 - v0)),\"n\":$((n1 - n0)),\"up\":$((uu1 + us1 - uu0 - us0)),\"upv\":$((uv1 - uv0)),\"upn\":$((un1 - un0)),\"flt\":$((f1 - f0)),\"idle0\":$((i01 - i00)),\"idle1\":$((i11 - i10)),\"wrk\":$out}" >>"$T/ab.jsonl"
    done
done
rss=()
for ((i = 0; i < n; i++)); do
    kb=0; for p in ${pids[$i]}; do kb=$((kb + $(awk '/^VmRSS/ {print $2}' "/proc/$p/status"))); done
    rss+=("${labels[$i]}=$kb")
done
python3 - "$T/ab.jsonl" "$(getconf CLK_TCK)" "${rss[@]}" <<'EOF'
import collections, json, statistics as st, sys
us = 1e6 / int(sys.argv[2])
d = collections.defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line); w = r["wrk"]; n = w["requests"]
    d[r["label"]].append((n / w["duration_us"] * 1e6, r["u"] * us / n, r["s"] * us / n, w["p99_us"] / 1e3, r["v"] * 1000 / n, r["n"] * 1000 / n,
                          r["up"] * us / n, r["idle0"] * us / w["duration_us"] * 100, r["idle1"] * us / w["duration_us"] * 100,
                          w["p50_us"] / 1e3, w["p90_us"] / 1e3, r["upv"] * 1000 / n, r["upn"] * 1000 / n, r["flt"] * 1000 / n))
rss = dict(a.split("=") for a in sys.argv[3:])
print(f"{'label':<16} {'req/s median (min-max)':>26} {'user':>6} {'sys':>6} µs/req {'p99 ms':>7}  switches/1k req (vol, invol)  RSS MiB at the end"
      "  upstream µs/req  idle % CPU 0, CPU 1  p50, p90 ms  upstream switches/1k (vol, invol)  faults/1k")
for k, v in d.items():
    print(f"{k:<16} {st.median(x[0] for x in v):>9.0f} ({min(x[0] for x in v):>6.0f}-{max(x[0] for x in v):>6.0f})"
          f" {st.median(x[1] for x in v):>6.1f} {st.median(x[2] for x in v):>6.1f}        {st.median(x[3] for x in v):>7.2f}"
          f"  {st.median(x[4] for x in v):>6.1f} {st.median(x[5] for x in v):>6.1f}  {int(rss[k]) / 1024:>8.1f}"
          f"  {st.median(x[6] for x in v):>15.1f}  {st.median(x[7] for x in v):>5.1f} {st.median(x[8] for x in v):>5.1f}"
          f"  {st.median(x[9] for x in v):>5.2f} {st.median(x[10] for x in v):>5.2f}"
          f"  {st.median(x[11] for x in v):>6.1f} {st.median(x[12] for x in v):>6.1f}  {st.median(x[13] for x in v):>6.2f}")
EOF
