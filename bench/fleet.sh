#!/usr/bin/env bash
# The fleet figure (SPEC section 7, section 10): AGENTS agent processes with empty caches, started
# together against one Redis, must make exactly one grant; measured is the time from their start
# until each holds the token (median and max over the agents, per round and over all rounds).
# Separate from bench/run.sh (which it does not run); prints the figures and writes BENCHMARKS.md's
# fleet section (bench/run.sh keeps that section when it rewrites the rest). Needs redis-server (installed from Debian's packages when missing), python3, curl.
#
#   bench/fleet.sh
#
# Knobs (environment): AGENTS (50), ROUNDS (5), MODE (run: `behest-agent run` daemons, timed to
# their "token ready" log line | token: one-shot `behest-agent token` processes, timed to their
# exit), BASE_PORT (18760: the IdP, the echo upstream, Redis), CARGO_TARGET_DIR (target),
# SKIP_BUILD=1 (use the binaries already built), KEEP=1 (leave the last round's agent logs).
set -euo pipefail

cd "$(dirname "$0")/.."
AGENTS=${AGENTS:-50}
ROUNDS=${ROUNDS:-5}
MODE=${MODE:-run}
BASE_PORT=${BASE_PORT:-18760}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
STARTED=$(date +%s)

log() { printf '[fleet %4ds] %s\n' "$(($(date +%s) - STARTED))" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $MODE == run || $MODE == token ]] || die "MODE is run or token, not $MODE"
.ci/install-redis
for t in python3 curl; do command -v "$t" >/dev/null 2>&1 || die "$t is needed"; done

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    # As bench/run.sh: the shipped build of the agent, then the servers apart from it.
    log "building: cargo build --release, then -p bench"
    CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --quiet
    CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --quiet -p bench
fi
BIN=$(cd "$TARGET_DIR" && pwd)/release/behest-agent
SERVERS=$(cd "$TARGET_DIR" && pwd)/release/bench-servers
[[ -x $BIN && -x $SERVERS ]] || die "no binaries in $TARGET_DIR/release"
GIT_REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || GIT_REV="$GIT_REV+uncommitted changes"
ulimit -n 65536 2>/dev/null || true

TMP=$(mktemp -d /tmp/behest-fleet.XXXXXX)
PIDS=()
AGENT_PIDS=()
cleanup() {
    local p
    for p in "${AGENT_PIDS[@]}" "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    for p in "${AGENT_PIDS[@]}" "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    if [[ ${KEEP:-0} == 1 ]]; then log "the last round's logs are in $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

IDP_PORT=$BASE_PORT
UP_PORT=$((BASE_PORT + 1))
REDIS_PORT=$((BASE_PORT + 2))
for p in "$IDP_PORT" "$UP_PORT" "$REDIS_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then die "port $p is taken (set BASE_PORT)"; fi
done
wait_port() {
    local i
    for ((i = 0; i < 200; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    die "nothing listens on port $1"
}

CLIENT_ID=bench-client
SECRET=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
AUDIENCE=https://api.behest.bench
IDP=http://127.0.0.1:$IDP_PORT

BENCH_CLIENT_SECRET="$SECRET" "$SERVERS" --idp "127.0.0.1:$IDP_PORT" --upstream "127.0.0.1:$UP_PORT" \
    --client-id "$CLIENT_ID" --audience "$AUDIENCE" >"$TMP/servers.log" 2>&1 </dev/null &
PIDS+=($!)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$TMP" \
    --logfile "$TMP/redis.log" </dev/null &
PIDS+=($!)
wait_port "$IDP_PORT"
wait_port "$REDIS_PORT"
grants() { curl -sf "$IDP/bench/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["grants"])'; }

: >"$TMP/none.toml"
agent_env() { # index
    printf '%s\n' \
        "BEHEST_AGENT_CONFIG=$TMP/none.toml" \
        "BEHEST_AGENT__AUTH__DOMAIN=$IDP" \
        "BEHEST_AGENT__AUTH__AUDIENCE=$AUDIENCE" \
        "BEHEST_AGENT__AUTH__CLIENT_ID=$CLIENT_ID" \
        "BEHEST_AGENT_CLIENT_SECRET=$SECRET" \
        "BEHEST_AGENT__TOKEN__CACHE_FILE=$TMP/agent-$1/token.json" \
        "BEHEST_AGENT__USAGE__LEDGER_FILE=" \
        "BEHEST_AGENT__CONTROL__SOCKET=$TMP/agent-$1/agent.sock" \
        "BEHEST_AGENT__TELEMETRY__LOG_FORMAT=json" \
        "BEHEST_AGENT__FLEET__REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0"
}

# One round: empty caches, an empty Redis, AGENTS processes started in one loop. Writes the
# seconds from the start until each held the token to $TMP/round-N.txt.
round() {
    local n=$1 i t0 before after envs
    rm -rf "$TMP"/agent-*
    redis-cli -p "$REDIS_PORT" FLUSHALL >/dev/null
    for ((i = 0; i < AGENTS; i++)); do
        mkdir -p "$TMP/agent-$i"
        agent_env "$i" >"$TMP/agent-$i/env"
    done
    before=$(grants)
    AGENT_PIDS=()
    t0=$(date +%s%N)
    for ((i = 0; i < AGENTS; i++)); do
        mapfile -t envs <"$TMP/agent-$i/env"
        if [[ $MODE == run ]]; then
            env -i PATH="$PATH" "${envs[@]}" "$BIN" run >"$TMP/agent-$i/log" 2>&1 </dev/null &
        else
            (env -i PATH="$PATH" "${envs[@]}" "$BIN" token >/dev/null 2>"$TMP/agent-$i/log" </dev/null \
                && date +%s%N >"$TMP/agent-$i/done") &
        fi
        AGENT_PIDS+=($!)
    done
    # Every agent holds the token (or 60 s passed).
    local deadline=$(($(date +%s) + 60)) held
    while :; do
        held=0
        for ((i = 0; i < AGENTS; i++)); do
            if [[ $MODE == run ]]; then
                grep -q '"token ready"' "$TMP/agent-$i/log" 2>/dev/null && held=$((held + 1))
            else
                [[ -s $TMP/agent-$i/done ]] && held=$((held + 1))
            fi
        done
        ((held == AGENTS)) && break
        (($(date +%s) < deadline)) || die "round $n: only $held of $AGENTS agents hold the token after 60 s (logs in $TMP)"
        sleep 0.1
    done
    after=$(grants)
    for p in "${AGENT_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${AGENT_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    AGENT_PIDS=()
    python3 - "$TMP" "$AGENTS" "$MODE" "$t0" >"$TMP/round-$n.txt" <<'EOF'
import json, sys, datetime
tmp, agents, mode, t0 = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
for i in range(agents):
    if mode == "token":
        print((int(open(f"{tmp}/agent-{i}/done").read()) - t0) / 1e9)
        continue
    for line in open(f"{tmp}/agent-{i}/log"):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("message", rec.get("fields", {}).get("message")) == "token ready":
            ts = datetime.datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00"))
            print(ts.timestamp() - t0 / 1e9)
            break
EOF
    echo "$((after - before))" >"$TMP/grants-$n.txt"
    local sources=""
    [[ $MODE == run ]] && sources=$(cat "$TMP"/agent-*/log | grep '"token ready"' | grep -o '"source":"[a-z]*"' | sort | uniq -c | tr -s ' ' | tr '\n' ';')
    log "round $n: $((after - before)) grant(s); $(python3 -c 'import sys,statistics; v=[float(x) for x in open(sys.argv[1])]; print(f"median {statistics.median(v)*1000:.0f} ms, max {max(v)*1000:.0f} ms over {len(v)} agents")' "$TMP/round-$n.txt") ${sources:+(token from: $sources)}"
}

read -r LOAD1 _ </proc/loadavg
log "$AGENTS agents ($MODE) per round, $ROUNDS rounds, Redis on 127.0.0.1:$REDIS_PORT, agent $GIT_REV, $(nproc) CPUs, load average $LOAD1"
for ((r = 1; r <= ROUNDS; r++)); do round "$r"; done

read -r LOAD2 _ </proc/loadavg
python3 - "$TMP" "$ROUNDS" "$AGENTS" "$MODE" "$GIT_REV" "$(nproc)" "$LOAD1" "$LOAD2" <<'EOF'
import statistics, sys
tmp, rounds, agents, mode, rev = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
cpus, load1, load2 = sys.argv[6], sys.argv[7], sys.argv[8]
grants = [int(open(f"{tmp}/grants-{n}.txt").read()) for n in range(1, rounds + 1)]
per = [[float(x) for x in open(f"{tmp}/round-{n}.txt")] for n in range(1, rounds + 1)]
medians = [statistics.median(v) * 1000 for v in per]
maxes = [max(v) * 1000 for v in per]
every = [x * 1000 for v in per for x in v]
ok = all(g == 1 for g in grants)
what = "`behest-agent run` daemons" if mode == "run" else "one-shot `behest-agent token` processes"
print()
print(f"fleet: {agents} {what} with empty caches started together against one Redis, {rounds} rounds (agent {rev}; {cpus} CPUs, load average {load1} before, {load2} after)")
print(f"  grants per round: {grants} -> {'exactly 1 each: met' if ok else 'NOT 1: not met'}")
print(f"  time until each holds the token, per round: median {', '.join(f'{m:.0f}' for m in medians)} ms; max {', '.join(f'{m:.0f}' for m in maxes)} ms")
print(f"  over all {len(every)} agents: median {statistics.median(every):.0f} ms, max {max(every):.0f} ms")
row = (f"| {agents} {what} with empty caches, one Redis | "
       f"{'1' if ok else '/'.join(map(str, grants))} grant per round ({rounds} rounds) | "
       f"median {statistics.median(every):.0f} ms, max {max(every):.0f} ms | "
       f"{'met' if ok else '**not met**'} |")
# BENCHMARKS.md's fleet section, between its markers (bench/run.sh keeps it when it rewrites the rest).
section = "\n".join([
    "<!-- fleet: written by bench/fleet.sh -->",
    "## Fleet (SPEC §10): one grant for a fleet",
    "",
    f"`bench/fleet.sh` ({'MODE=token ' if mode == 'token' else ''}agent {rev}; {cpus} CPUs, load average {load1} before, {load2} after): "
    "the agents start together against one `redis-server`, their caches empty; counted are the IdP's grants and the time "
    "from the start until each agent holds the token. Most of it is 50 processes starting at once on the machine's CPUs "
    "(one agent alone: about 80 ms).",
    "",
    "| agents | grants | time until all hold the token | verdict |",
    "|---|---|---|---|",
    row,
    "<!-- /fleet -->",
])
out = "BENCHMARKS.md"
try:
    text = open(out).read()
except FileNotFoundError:
    text = ""
start, end = text.find("<!-- fleet"), text.find("<!-- /fleet -->")
if start >= 0 and end >= 0:
    text = text[:start] + section + text[end + len("<!-- /fleet -->"):]
else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
open(out, "w").write(text)
print(f"\nwrote the fleet section of {out}")
sys.exit(0 if ok else 1)
EOF
