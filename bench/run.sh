#!/usr/bin/env bash
# behest-agent's benchmark: the shipped binary (plain `cargo build --release`, the one the Debian
# package contains) beside a direct connection and beside nginx configured as the same
# header-injecting reverse proxy, all against the same loopback upstreams, in one run, in paired
# rounds; in the request cells also beside itself with `proxy.require_key = true` (the agent_key
# path, its client sending a local key). Writes BENCHMARKS.md with the SPEC section 7 verdicts
# (and the raw figures to bench/results/). Not part of CI. Run from anywhere, as root or with sudo
# rights for apt-get:
#
#   bench/run.sh
#
# Knobs (environment): ROUNDS (9, SPEC section 7's least), DURATION (seconds per wrk run, 4),
# STREAMS (10 streams per path per round), STREAM_EVENTS (20 content events per stream), STREAM_MS
# (20 ms between events), HOLD_STREAMS (1000), BURST (1000), BURST_GRANT_DELAY_MS (3000: how late
# the IdP answers the burst agent's first grant), BASE_PORT (18700), OUT (BENCHMARKS.md),
# NGINX_KEEPALIVE (256: nginx's upstream pool), FOREIGN_MAX (0.05), RETRIES (2), QUIET_BUDGET (300 s),
# CARGO_TARGET_DIR (target), SKIP_BUILD=1 (use the binaries already built).
#
# What runs (all on 127.0.0.1):
#   bench-servers         (bench/src/main.rs) devkit's IdP and echo upstream, the ones `behest-agent
#                         dev` and the tests use, served by the agent's accept loop: the IdP (RS256
#                         JWTs, JWKS; its grant count and a slow first grant under /bench/) and the
#                         streaming upstream (SSE events STREAM_MS apart)
#   nginx (upstream)      the fast upstream of the request cells: an OpenAI-style JSON body from
#                         memory, 401 without a bearer
#   behest-agent run      the agent under test (a second one for streams, a third for the burst), and
#                         for the request cells' agent_key path a fourth configured like the first
#                         but with `proxy.require_key = true` and a keys file holding one key made
#                         offline with `behest-agent key create`, which wrk sends as its bearer
#   nginx (proxy)         the comparison: proxy_pass + keepalive pool + proxy_set_header Authorization
#   wrk, bench/stream_client.js, bench/burst.js, hyperfine   the load
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${ROUNDS:-9}
DURATION=${DURATION:-4}
STREAMS=${STREAMS:-10}
STREAM_EVENTS=${STREAM_EVENTS:-20}
STREAM_MS=${STREAM_MS:-20}
HOLD_STREAMS=${HOLD_STREAMS:-1000}
BURST=${BURST:-1000}
BURST_GRANT_DELAY_MS=${BURST_GRANT_DELAY_MS:-3000}
BASE_PORT=${BASE_PORT:-18700}
NGINX_KEEPALIVE=${NGINX_KEEPALIVE:-256}
OUT=${OUT:-BENCHMARKS.md}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
RESULTS=$ROOT/bench/results
STARTED=$(date +%s)

log() { printf '[bench %4ds] %s\n' "$(($(date +%s) - STARTED))" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- 1. tools and the build
need=()
for t in nginx:nginx wrk:wrk hyperfine:hyperfine curl:curl taskset:util-linux; do
    command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t#*:}")
done
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if ((${#need[@]})); then
    log "installing from Debian's packages: ${need[*]}"
    SUDO=; [[ $(id -u) -eq 0 ]] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    # Two builds, not one with `-p bench`: built together, the bench crate's dependencies could
    # change the features the agent's are built with, and the binary measured would not be the
    # one `cargo build --release` makes.
    log "building the agent: cargo build --release (target dir $TARGET_DIR)"
    CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --quiet
    log "building the benchmark's servers: cargo build --release -p bench"
    CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --quiet -p bench
fi
BIN=$(cd "$TARGET_DIR" && pwd)/release/behest-agent
SERVERS=$(cd "$TARGET_DIR" && pwd)/release/bench-servers
[[ -x $BIN ]] || die "no binary at $BIN"
[[ -x $SERVERS ]] || die "no binary at $SERVERS"
# The source the binary was built from, read now: the tree may change while the benchmark runs.
GIT_REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || GIT_REV="$GIT_REV+uncommitted changes"

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
(( $(ulimit -n) >= 4 * HOLD_STREAMS )) || die "open-file limit $(ulimit -n) is too low for $HOLD_STREAMS streams"

# ---------------------------------------------------------------- 2. cores
NCPU=$(nproc)
if ((NCPU >= 3)); then
    LOAD_CPUS=0; PROXY_CPUS=1; UP_CPUS=2
    PINNING="load generator on CPU 0, proxy under test on CPU 1, upstreams and IdP on CPU 2"
elif ((NCPU == 2)); then
    LOAD_CPUS=0; PROXY_CPUS=1; UP_CPUS=1
    PINNING="load generator on CPU 0; the proxy under test, the upstreams and the IdP share CPU 1"
else
    LOAD_CPUS=0; PROXY_CPUS=0; UP_CPUS=0
    PINNING="one CPU: everything shares it (no pinning possible)"
fi
on() { local cpus=$1; shift; taskset -c "$cpus" "$@"; }
# spawn CPUS LOG CMD...: starts CMD in the background, pinned, output to LOG; SPAWNED is its pid
# (taskset execs CMD, so the pid is CMD's own, and cleanup can end it).
spawn() {
    local cpus=$1 logf=$2
    shift 2
    taskset -c "$cpus" "$@" >"$logf" 2>&1 </dev/null &
    SPAWNED=$!
    PIDS+=("$SPAWNED")
}

# ---------------------------------------------------------------- 3. processes
TMP=$(mktemp -d /tmp/behest-bench.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

IDP_PORT=$BASE_PORT
UP_PORT=$((BASE_PORT + 1))
SSE_PORT=$((BASE_PORT + 2))
NGX_PORT=$((BASE_PORT + 3))
NGX_SSE_PORT=$((BASE_PORT + 4))
AGENT_PORT=$((BASE_PORT + 5))
AGENT_SSE_PORT=$((BASE_PORT + 6))
AGENT_BURST_PORT=$((BASE_PORT + 7))
SINK_PORT=$((BASE_PORT + 8))
AGENT_KEY_PORT=$((BASE_PORT + 9))
for p in $(seq "$BASE_PORT" $((BASE_PORT + 9))); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then die "port $p is taken (set BASE_PORT)"; fi
done

wait_port() { # port [seconds]
    local i
    for ((i = 0; i < ${2:-10} * 20; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    die "nothing listens on port $1"
}

CLIENT_ID=bench-client
SECRET=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
AUDIENCE=https://api.behest.bench
IDP=http://127.0.0.1:$IDP_PORT

spawn "$UP_CPUS" "$TMP/servers.log" env BENCH_CLIENT_SECRET="$SECRET" "$SERVERS" --idp "127.0.0.1:$IDP_PORT" \
    --upstream "127.0.0.1:$SSE_PORT" --client-id "$CLIENT_ID" --audience "$AUDIENCE" \
    --sse-interval-ms "$STREAM_MS"
wait_port "$IDP_PORT"
wait_port "$SSE_PORT"
json_field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# The token nginx injects: one the same IdP signed, with a grant's claims, so both proxies send
# the same bytes.
TOKEN=$(curl -sf -X POST "$IDP/bench/token" | json_field access_token)
DIRECT_AUTH="Bearer $TOKEN"

fill() { # template out
    sed -e "s|@TMP@|$TMP|g" -e "s|@UPSTREAM_PORT@|$UP_PORT|g" -e "s|@SSE_PORT@|$SSE_PORT|g" \
        -e "s|@NGINX_PORT@|$NGX_PORT|g" -e "s|@NGINX_SSE_PORT@|$NGX_SSE_PORT|g" \
        -e "s|@SINK_PORT@|$SINK_PORT|g" -e "s|@KEEPALIVE@|$NGINX_KEEPALIVE|g" -e "s|@TOKEN@|$TOKEN|g" "$1" >"$2"
}
fill bench/nginx-upstream.conf.in "$TMP/nginx-upstream.conf"
fill bench/nginx-proxy.conf.in "$TMP/nginx-proxy.conf"
spawn "$UP_CPUS" "$TMP/nginx-upstream.out" "$NGINX" -p "$TMP" -e "$TMP/nginx-upstream.err" \
    -c "$TMP/nginx-upstream.conf"
NGX_UP_MASTER=$SPAWNED
spawn "$PROXY_CPUS" "$TMP/nginx-proxy.out" "$NGINX" -p "$TMP" -e "$TMP/nginx-proxy.err" \
    -c "$TMP/nginx-proxy.conf"
NGX_MASTER=$SPAWNED
wait_port "$UP_PORT"
wait_port "$NGX_PORT"

agent_env() { # name port upstream_port
    printf '%s\n' \
        "BEHEST_AGENT__AUTH__DOMAIN=$IDP" \
        "BEHEST_AGENT__AUTH__AUDIENCE=$AUDIENCE" \
        "BEHEST_AGENT__AUTH__CLIENT_ID=$CLIENT_ID" \
        "BEHEST_AGENT_CLIENT_SECRET=$SECRET" \
        "BEHEST_AGENT__TOKEN__CACHE_FILE=" \
        "BEHEST_AGENT__USAGE__LEDGER_FILE=$TMP/usage-$1.jsonl" \
        "BEHEST_AGENT__CONTROL__SOCKET=$TMP/agent-$1.sock" \
        "BEHEST_AGENT__PROXY__LISTEN=127.0.0.1:$2" \
        "BEHEST_AGENT__PROXY__UPSTREAM=http://127.0.0.1:$3" \
        "BEHEST_AGENT__PROXY__ALLOW_INSECURE_UPSTREAM=true" \
        "BEHEST_AGENT_CONFIG=$TMP/none.toml"
}
: >"$TMP/none.toml"
start_agent() { # name port upstream_port [VAR=value...] -> sets AGENT_PID
    local -a envs
    mapfile -t envs < <(agent_env "$1" "$2" "$3")
    spawn "$PROXY_CPUS" "$TMP/agent-$1.log" env "${envs[@]}" "${@:4}" "$BIN" --log-level warn run
    AGENT_PID=$SPAWNED
    wait_port "$2"
}
agent_ready() { # name
    local i
    for ((i = 0; i < 200; i++)); do
        curl -sf --unix-socket "$TMP/agent-$1.sock" http://agent/readyz >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    cat "$TMP/agent-$1.log" >&2
    die "agent $1 never became ready"
}
rss_kib() { # pid... -> summed VmRSS in KiB
    local sum=0 p v
    for p in "$@"; do
        v=$(awk '/^VmRSS:/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        sum=$((sum + ${v:-0}))
    done
    echo "$sum"
}
cpu_ticks() { # pid... -> summed utime+stime (clock ticks)
    local sum=0 p
    for p in "$@"; do
        sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$sum"
}
nginx_pids() { echo "$NGX_MASTER" $(pgrep -P "$NGX_MASTER" | tr '\n' ' '); }

# Other people's work on this machine (a compiler, a test suite) would skew every figure, and the
# benchmark cannot stop it; it measures it instead. "Foreign" CPU = the machine's busy ticks
# (/proc/stat) minus those of the benchmark's own processes (its servers, and through this shell's
# cutime every child it reaped: wrk, node clients, curl). A run with more than FOREIGN_MAX of the
# machine busy elsewhere is repeated (at most RETRIES times) after waiting for a quiet moment.
FOREIGN_MAX=${FOREIGN_MAX:-0.05}
RETRIES=${RETRIES:-2}
machine_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8, $9}' /proc/stat; }
our_ticks() {
    local sum p
    sum=$(awk '{print $14 + $15 + $16 + $17}' "/proc/$$/stat")
    for p in "${PIDS[@]}" $(pgrep -P "$NGX_MASTER") $(pgrep -P "$NGX_UP_MASTER"); do
        [[ -r /proc/$p/stat ]] && sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$sum"
}
# probe_start; ...; probe_end SECONDS -> sets FOREIGN (share of the machine, 0..1) and STEAL (same)
probe_start() { read -r P_BUSY P_STEAL < <(machine_ticks); P_OURS=$(our_ticks); P_T0=$(date +%s%N); }
probe_end() {
    local busy steal ours secs
    read -r busy steal < <(machine_ticks)
    ours=$(our_ticks)
    secs=$(( $(date +%s%N) - P_T0 ))
    FOREIGN=$(awk -v f=$(( (busy - P_BUSY) - (ours - P_OURS) )) -v ns="$secs" -v n="$NCPU" -v hz="$HZ" \
        'BEGIN { v = f / (ns / 1e9 * hz * n); if (v < 0) v = 0; printf "%.3f", v }')
    STEAL=$(awk -v f=$(( steal - P_STEAL )) -v ns="$secs" -v n="$NCPU" -v hz="$HZ" \
        'BEGIN { printf "%.3f", f / (ns / 1e9 * hz * n) }')
}
quiet() { awk -v f="$FOREIGN" -v m="$FOREIGN_MAX" 'BEGIN { exit !(f <= m) }'; }
# Waits (at most $1 seconds) for a second with little foreign CPU.
QUIET_BUDGET=${QUIET_BUDGET:-300}
QUIET_SPENT=0
wait_quiet() {
    local i
    for ((i = 0; i < $1; i++)); do
        if ((QUIET_SPENT >= QUIET_BUDGET)); then
            ((QUIET_SPENT++ == QUIET_BUDGET)) && log "spent the ${QUIET_BUDGET} s allowed waiting for quiet; no more waiting or repeats"
            return 0
        fi
        QUIET_SPENT=$((QUIET_SPENT + 1))
        probe_start; sleep 1; probe_end
        quiet && return 0
        ((i % 10 == 0)) && log "waiting for the machine to quieten (foreign CPU $FOREIGN of the machine)"
    done
    log "the machine stayed busy (foreign CPU $FOREIGN); going on, the figures will say so"
    return 0
}
HZ=$(getconf CLK_TCK)

start_agent main "$AGENT_PORT" "$UP_PORT"
AGENT=$AGENT_PID
agent_ready main
start_agent sse "$AGENT_SSE_PORT" "$SSE_PORT"
AGENT_SSE=$AGENT_PID
agent_ready sse
# The agent_key path: the main agent's configuration plus require_key and a keys file holding one
# local key, made offline (no daemon owns the file yet) the way an operator would.
KEY_ENV=(BEHEST_AGENT__PROXY__REQUIRE_KEY=true "BEHEST_AGENT__PROXY__KEYS_FILE=$TMP/keys.json")
mapfile -t KEY_AGENT_ENV < <(agent_env key "$AGENT_KEY_PORT" "$UP_PORT")
LOCAL_KEY=$(env "${KEY_AGENT_ENV[@]}" "${KEY_ENV[@]}" "$BIN" --log-level warn key create --name bench 2>"$TMP/key-create.err") \
    || die "behest-agent key create failed: $(cat "$TMP/key-create.err")"
[[ $LOCAL_KEY == bak_* ]] || die "behest-agent key create printed no key"
start_agent key "$AGENT_KEY_PORT" "$UP_PORT" "${KEY_ENV[@]}"
AGENT_KEY=$AGENT_PID
agent_ready key
sleep 1
AGENT_IDLE_KIB=$(rss_kib "$AGENT")
AGENT_SSE_IDLE_KIB=$(rss_kib "$AGENT_SSE")
NGINX_IDLE_KIB=$(rss_kib $(nginx_pids))
AGENT_THREADS=$(awk '/^Threads:/{print $2}' "/proc/$AGENT/status")
NGINX_WORKERS=$(pgrep -c -P "$NGX_MASTER")
log "agent idle RSS ${AGENT_IDLE_KIB} KiB (${AGENT_THREADS} threads); nginx proxy idle RSS ${NGINX_IDLE_KIB} KiB (master + ${NGINX_WORKERS} worker)"

# ---------------------------------------------------------------- 4. sanity
DIRECT=http://127.0.0.1:$UP_PORT
VIA_AGENT=http://127.0.0.1:$AGENT_PORT
VIA_NGINX=http://127.0.0.1:$NGX_PORT
VIA_KEY=http://127.0.0.1:$AGENT_KEY_PORT
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
[[ $(code "$DIRECT/v1/models") == 401 ]] || die "the upstream does not refuse a request without a bearer"
[[ $(code -H "Authorization: $DIRECT_AUTH" "$DIRECT/v1/models") == 200 ]] || die "direct: no 200"
[[ $(code "$VIA_AGENT/v1/models") == 200 ]] || die "agent: no 200 (see $TMP/agent-main.log)"
[[ $(code "$VIA_NGINX/v1/models") == 200 ]] || die "nginx proxy: no 200"
[[ $(code -H "Authorization: Bearer placeholder" "$VIA_KEY/v1/models") == 401 ]] \
    || die "agent_key: a request without a local key was not refused (see $TMP/agent-key.log)"
[[ $(code -H "Authorization: Bearer $LOCAL_KEY" "$VIA_KEY/v1/models") == 200 ]] \
    || die "agent_key: no 200 with the local key (see $TMP/agent-key.log)"
[[ $(code -X POST --data-binary "@/dev/null" -H 'Content-Type: application/json' "$VIA_AGENT/v1/chat/completions") == 200 ]] \
    || die "agent: POST failed"
[[ $(curl -sf -X POST --data-binary @<(head -c 1048576 /dev/zero) "$VIA_AGENT/v1/files") == *file-bench* ]] \
    || die "agent: upload failed"
[[ $(curl -sf -X POST --data-binary @<(head -c 1048576 /dev/zero) "$VIA_NGINX/v1/files") == *file-bench* ]] \
    || die "nginx: upload failed"
stream() { # url [curl args]: a streamed chat completion of 2 content events
    local url=$1; shift
    curl -sfN -X POST -H 'Content-Type: application/json' -H 'x-echo-events: 2' "$@" "$url/v1/chat/completions" \
        -d '{"model":"echo-1","stream":true,"messages":[{"role":"user","content":"hello"}]}'
}
[[ $(code -X POST -d '{}' "http://127.0.0.1:$SSE_PORT/v1/chat/completions") == 401 ]] \
    || die "the streaming upstream does not refuse a request without a bearer"
stream "http://127.0.0.1:$SSE_PORT" -H "Authorization: $DIRECT_AUTH" | grep -q '\[DONE\]' || die "direct: no stream"
stream "http://127.0.0.1:$AGENT_SSE_PORT" | grep -q '\[DONE\]' || die "agent: no stream (see $TMP/agent-sse.log)"
stream "http://127.0.0.1:$NGX_SSE_PORT" | grep -q '\[DONE\]' || die "nginx: no stream"
log "sanity checks passed"

mkdir -p "$RESULTS"
RAW=$RESULTS/raw.jsonl
: >"$RAW"

# ---------------------------------------------------------------- 5. throughput and latency (wrk)
PATHS=(direct agent nginx) # the streams' paths
REQ_PATHS=(direct agent agent_key nginx)
REQ_NP=${#REQ_PATHS[@]}
NP=${#PATHS[@]}
url_of() {
    case $1 in direct) echo "$DIRECT" ;; agent) echo "$VIA_AGENT" ;; agent_key) echo "$VIA_KEY" ;; nginx) echo "$VIA_NGINX" ;; esac
}
auth_of() {
    case $1 in direct) echo "$DIRECT_AUTH" ;; agent_key) echo "Bearer $LOCAL_KEY" ;; *) echo "Bearer placeholder" ;; esac
}
pids_of() { case $1 in direct) echo "" ;; agent) echo "$AGENT" ;; agent_key) echo "$AGENT_KEY" ;; nginx) nginx_pids ;; esac; }

# name method body concurrency path
SCENARIOS=(
    "get_c1 GET none 1 /v1/models"
    "get_c16 GET none 16 /v1/models"
    "get_c128 GET none 128 /v1/models"
    "post_c1 POST small 1 /v1/chat/completions"
    "post_c16 POST small 16 /v1/chat/completions"
    "post_c128 POST small 128 /v1/chat/completions"
    "upload_c1 POST 1MiB 1 /v1/files"
    "upload_c16 POST 1MiB 16 /v1/files"
)
WRK_THREADS=$(taskset -c "$LOAD_CPUS" nproc)

run_wrk() { # scenario-line path round duration
    local name method body conc upath
    read -r name method body conc upath <<<"$1"
    local path=$2 round=$3 dur=$4
    local threads=$((conc < WRK_THREADS ? conc : WRK_THREADS))
    local pids; pids=$(pids_of "$path")
    local attempt out json ticks t0
    for ((attempt = 0; attempt <= RETRIES; attempt++)); do
        ((attempt > 0)) && wait_quiet 60
        t0=0; [[ -n $pids ]] && t0=$(cpu_ticks $pids)
        probe_start
        out=$(BENCH_METHOD=$method BENCH_BODY=$body BENCH_AUTH=$(auth_of "$path") \
            taskset -c "$LOAD_CPUS" wrk -t"$threads" -c"$conc" -d"${dur}s" --timeout 10s --latency \
            -s bench/wrk_report.lua "$(url_of "$path")$upath" 2>&1) || true
        probe_end
        ticks=null; [[ -n $pids ]] && ticks=$(($(cpu_ticks $pids) - t0))
        ((round == 0)) && break
        quiet && break
        ((QUIET_SPENT >= QUIET_BUDGET)) && break
        log "$name via $path: foreign CPU $FOREIGN of the machine during the run; repeating it"
    done
    json=$(grep '^WRKJSON ' <<<"$out" | head -1 | cut -d' ' -f2-)
    [[ -n $json ]] || { log "wrk failed: $out"; json='null'; }
    if ((round > 0)); then
        printf '{"kind":"wrk","test":"%s","path":"%s","round":%d,"concurrency":%d,"proxy_cpu_ticks":%s,"foreign":%s,"steal":%s,"attempts":%d,"wrk":%s}\n' \
            "$name" "$path" "$round" "$conc" "$ticks" "$FOREIGN" "$STEAL" "$((attempt > RETRIES ? RETRIES + 1 : attempt + 1))" "$json" >>"$RAW"
    fi
}

wait_quiet "${QUIET_WAIT:-120}"
log "warm-up: 1 s per scenario and path"
for s in "${SCENARIOS[@]}"; do for p in "${REQ_PATHS[@]}"; do run_wrk "$s" "$p" 0 1; done; done
for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r/$ROUNDS: ${#SCENARIOS[@]} scenarios x $REQ_NP paths x ${DURATION}s"
    for s in "${SCENARIOS[@]}"; do
        # Rotate the order every round so no path always runs first.
        for ((k = 0; k < REQ_NP; k++)); do run_wrk "$s" "${REQ_PATHS[$(((k + r) % REQ_NP))]}" "$r" "$DURATION"; done
    done
done
AGENT_AFTER_LOAD_KIB=$(rss_kib "$AGENT")
AGENT_AFTER_LOAD_HWM_KIB=$(awk '/^VmHWM:/{print $2}' "/proc/$AGENT/status")
LOAD_ENDED=$(date +%s)
kill "$AGENT_KEY" 2>/dev/null || true # its part is done; the rest of the run does not need it

# ---------------------------------------------------------------- 6. streaming: TTFB and event delay
# Through the second agent and nginx's second server, both to bench-servers' echo upstream.
sse_url_of() {
    case $1 in
        direct) echo "http://127.0.0.1:$SSE_PORT/v1/chat/completions" ;;
        agent) echo "http://127.0.0.1:$AGENT_SSE_PORT/v1/chat/completions" ;;
        nginx) echo "http://127.0.0.1:$NGX_SSE_PORT/v1/chat/completions" ;;
    esac
}
log "streaming: $ROUNDS rounds x $NP paths x $STREAMS streams of $STREAM_EVENTS content events ${STREAM_MS} ms apart"
for ((r = 1; r <= ROUNDS; r++)); do
    for ((k = 0; k < NP; k++)); do
        p=${PATHS[$(((k + r) % NP))]}
        for ((attempt = 0; attempt <= RETRIES; attempt++)); do
            ((attempt > 0)) && wait_quiet 60
            probe_start
            out=$(on "$LOAD_CPUS" node bench/stream_client.js measure --url "$(sse_url_of "$p")" \
                --control "$IDP" --auth "$(auth_of "$p")" --streams "$STREAMS" --events "$STREAM_EVENTS") \
                || die "stream client failed on $p"
            probe_end
            quiet && break
            ((QUIET_SPENT >= QUIET_BUDGET)) && break
            log "streams via $p: foreign CPU $FOREIGN of the machine during the run; repeating it"
        done
        printf '{"kind":"stream","path":"%s","round":%d,"foreign":%s,"steal":%s,"data":%s}\n' \
            "$p" "$r" "$FOREIGN" "$STEAL" "$out" >>"$RAW"
    done
done

# ---------------------------------------------------------------- 7. memory with open streams
hold_streams() { # path pids...
    local path=$1; shift
    local before; before=$(rss_kib "$@")
    : >"$TMP/hold-$path.out"
    spawn "$LOAD_CPUS" "$TMP/hold-$path.out" node bench/stream_client.js hold --url "$(sse_url_of "$path")" \
        --auth "$(auth_of "$path")" --streams "$HOLD_STREAMS" --hold-s 4
    local client=$SPAWNED
    local i
    for ((i = 0; i < 700; i++)); do grep -q READY "$TMP/hold-$path.out" && break; sleep 0.05; done
    sleep 1.5
    local rss; rss=$(rss_kib "$@")
    local line; line=$(grep READY "$TMP/hold-$path.out" || echo "READY open=0 failed=? no-answer")
    wait "$client" || true
    sleep 1
    local after; after=$(rss_kib "$@")
    printf '{"kind":"hold","path":"%s","streams":%d,"rss_before_kib":%d,"rss_kib":%d,"rss_after_kib":%d,"client":"%s"}\n' \
        "$path" "$HOLD_STREAMS" "$before" "$rss" "$after" "$line" >>"$RAW"
    log "$HOLD_STREAMS streams via $path: RSS $rss KiB ($line)"
}
hold_streams agent "$AGENT_SSE"
AGENT_SSE_HWM_KIB=$(awk '/^VmHWM:/{print $2}' "/proc/$AGENT_SSE/status")
hold_streams nginx $(nginx_pids)

# ---------------------------------------------------------------- 8. `behest-agent token` with hyperfine
log "behest-agent token (daemon running) vs cat, hyperfine"
mapfile -t MAIN_ENV < <(agent_env main "$AGENT_PORT" "$UP_PORT")
env "${MAIN_ENV[@]}" "$BIN" token >"$TMP/token.txt" || die "behest-agent token failed"
[[ -s $TMP/token.txt ]] || die "behest-agent token printed nothing"
wait_quiet 60
probe_start
env "${MAIN_ENV[@]}" taskset -c "$LOAD_CPUS" hyperfine -N --warmup 20 --runs 300 --style none \
    --export-json "$TMP/hyperfine.json" "$BIN token" "cat $TMP/token.txt" >"$TMP/hyperfine.out" 2>&1 \
    || die "hyperfine failed: $(cat "$TMP/hyperfine.out")"
probe_end
python3 - "$TMP/hyperfine.json" "$FOREIGN" >>"$RAW" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["results"]:
    print(json.dumps({"kind": "hyperfine", "foreign": float(sys.argv[2]), "command": r["command"].split()[0].split("/")[-1],
                      "mean_s": r["mean"], "stddev_s": r["stddev"], "median_s": r["median"],
                      "min_s": r["min"], "max_s": r["max"], "runs": len(r["times"]),
                      "user_s": r["user"], "system_s": r["system"]}))
EOF

# ---------------------------------------------------------------- 9. 1,000 requests, empty cache
# The IdP answers the next token request BURST_GRANT_DELAY_MS late (devkit's Fault::Delay): the
# fresh agent's first grant is in flight while the burst arrives; burst.js checks it still was
# once every request had been written.
log "burst: $BURST concurrent requests on a fresh agent whose first grant takes ${BURST_GRANT_DELAY_MS} ms"
G0=$(curl -sf "$IDP/bench/stats")
curl -sf -X POST "$IDP/bench/delay-next-grant?ms=$BURST_GRANT_DELAY_MS" >/dev/null
start_agent burst "$AGENT_BURST_PORT" "$UP_PORT"
AGENT_BURST=$AGENT_PID
# The agent asks for its token as it starts; the burst goes once that request is at the IdP.
asked0=$(json_field token_requests <<<"$G0")
for ((i = 0; i < 100; i++)); do
    (($(curl -sf "$IDP/bench/stats" | json_field token_requests) > asked0)) && break
    sleep 0.05
done
BURST_OUT=$(on "$LOAD_CPUS" node bench/burst.js --url "http://127.0.0.1:$AGENT_BURST_PORT/v1/chat/completions" \
    --control "$IDP" --requests "$BURST" 2>&1 | tail -1)
G1=$(curl -sf "$IDP/bench/stats")
BURST_STATUS=$(curl -sf --unix-socket "$TMP/agent-burst.sock" http://agent/v1/status || echo null)
python3 - "$G0" "$G1" "$BURST_OUT" "$BURST_STATUS" "$BURST_GRANT_DELAY_MS" >>"$RAW" <<'EOF'
import json, sys
g0, g1, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
try:
    st = json.loads(sys.argv[4])
    grants_ok = st.get("token", {}).get("grants_ok")
except Exception:
    grants_ok = None
print(json.dumps({"kind": "burst", "grants": g1["grants"] - g0["grants"],
                  "token_requests": g1["token_requests"] - g0["token_requests"],
                  "grant_delay_ms": int(sys.argv[5]), "agent_grants_ok": grants_ok, **out}))
EOF
kill "$AGENT_BURST" 2>/dev/null || true

# ---------------------------------------------------------------- 9b. idle again
# The main agent has served nothing since the wrk rounds. Its idle upstream connections close
# after the pool's idle timeout (30 s; they are closed within 15 s more) and jemalloc's
# background thread returns freed pages about 10 s later: measured SETTLE seconds after the load.
SETTLE=${SETTLE:-75}
left=$((LOAD_ENDED + SETTLE - $(date +%s)))
((left > 0)) && { log "waiting ${left} s for the main agent to settle"; sleep "$left"; }
AGENT_SETTLED_KIB=$(rss_kib "$AGENT")
SETTLED_AFTER=$(($(date +%s) - LOAD_ENDED))
log "main agent RSS ${AGENT_SETTLED_KIB} KiB, ${SETTLED_AFTER} s after its load"

# ---------------------------------------------------------------- 10. BENCHMARKS.md
AGENT_VERSION=$("$BIN" --version)
python3 - >"$RESULTS/meta.json" <<EOF
import json, platform
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = next((l.split(":", 1)[1].strip() for l in open("/proc/meminfo") if l.startswith("MemTotal")), "?")
print(json.dumps({
  "nproc": $NCPU, "cpu": cpu, "kernel": platform.release(), "mem": mem,
  "pinning": "$PINNING", "load_cpus": "$LOAD_CPUS", "proxy_cpus": "$PROXY_CPUS", "upstream_cpus": "$UP_CPUS",
  "rounds": $ROUNDS, "foreign_max": $FOREIGN_MAX, "nginx_keepalive": $NGINX_KEEPALIVE, "quiet_spent_s": $QUIET_SPENT, "duration_s": $DURATION, "streams": $STREAMS, "stream_events": $STREAM_EVENTS,
  "stream_ms": $STREAM_MS, "hold_streams": $HOLD_STREAMS, "burst": $BURST,
  "agent_version": "$AGENT_VERSION", "git": "$GIT_REV",
  "nginx": "$("$NGINX" -v 2>&1 | sed 's/.*nginx\///')", "wrk": "$(wrk --version 2>&1 | head -1 | awk '{print $2}')",
  "node": "$(node --version)", "hyperfine": "$(hyperfine --version | awk '{print $2}')",
  "agent_idle_kib": $AGENT_IDLE_KIB, "agent_sse_idle_kib": $AGENT_SSE_IDLE_KIB,
  "agent_after_load_kib": $AGENT_AFTER_LOAD_KIB, "agent_after_load_hwm_kib": $AGENT_AFTER_LOAD_HWM_KIB,
  "agent_settled_kib": $AGENT_SETTLED_KIB, "settled_after_s": $SETTLED_AFTER,
  "agent_sse_hwm_kib": $AGENT_SSE_HWM_KIB, "nginx_idle_kib": $NGINX_IDLE_KIB,
  "agent_threads": $AGENT_THREADS, "nginx_workers": $NGINX_WORKERS,
  "clk_tck": $(getconf CLK_TCK), "elapsed_s": $(($(date +%s) - STARTED)),
  "date": "$(date -u +%Y-%m-%dT%H:%MZ)",
}))
EOF
# The fleet section is bench/fleet.sh's: kept as it is.
FLEET_SECTION=$(python3 -c 'import sys; t = open(sys.argv[1]).read() if __import__("os").path.exists(sys.argv[1]) else ""; a, b = t.find("<!-- fleet"), t.find("<!-- /fleet -->"); print(t[a:b + 15] if a >= 0 and b >= 0 else "")' "$OUT")
python3 bench/summarize.py "$RAW" "$RESULTS/meta.json" >"$OUT"
[[ -z $FLEET_SECTION ]] || printf '\n%s\n' "$FLEET_SECTION" >>"$OUT"
(($(wc -l <"$OUT") <= 150)) || log "warning: $OUT has $(wc -l <"$OUT") lines, more than 150 (shorten bench/summarize.py's output)"
# Keep every run's figures (bench/results/ is not committed); BENCHMARKS.md can be regenerated
# from them after bench/summarize.py changes: python3 bench/summarize.py RAW META
KEEP=$RESULTS/$(date -u +%Y%m%dT%H%MZ)
mkdir -p "$KEEP" && cp "$RAW" "$RESULTS/meta.json" "$KEEP/"
log "wrote $OUT (raw figures in ${KEEP#$ROOT/})"
