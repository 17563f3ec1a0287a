#!/usr/bin/env python3
"""Turns bench/run.sh's raw figures into BENCHMARKS.md (on stdout).

    python3 bench/summarize.py bench/results/raw.jsonl bench/results/meta.json

The SPEC section 7 bars are judged here from the figures, strictly and as section 7 words them:
a bar missed by any margin is reported as missed. The agent and nginx are compared round by round
(in a round every path runs a scenario back to back); other figures are medians over the rounds,
with the spread (lowest to highest round) beside them. The reading at the end is generated from
the same figures.
"""
import json
import math
import statistics
import sys
from collections import defaultdict

MAX_LINES = 150

raw_path, meta_path = sys.argv[1:3]
rows = [json.loads(line) for line in open(raw_path) if line.strip()]
meta = json.load(open(meta_path))
PATHS = ["direct", "agent", "nginx"]  # the streams'
REQ_PATHS = ["direct", "agent", "agent_key", "nginx"]  # the request cells': agent_key has require_key on
med = statistics.median
TICK_US = 1e6 / meta["clk_tck"]
MIB = 1024


def pct(values, p):
    """Nearest-rank percentile."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = max(0, min(len(v) - 1, int(round(p / 100 * len(v) + 0.5)) - 1))
    return v[k]


def spread(values, fmt):
    return f"{fmt(min(values))}–{fmt(max(values))}"


def ms(us):
    return f"{us / 1000:.3f}"


def mib(kib):
    return f"{kib / MIB:.1f} MiB"


def verdict(ok):
    return "met" if ok else "**not met**"


def n_of(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


# ------------------------------------------------------------------ requests (wrk)
wrk = defaultdict(lambda: defaultdict(list))
tests = []
for r in rows:
    if r["kind"] != "wrk" or r["wrk"] is None:
        continue
    if r["test"] not in tests:
        tests.append(r["test"])
    x = r["wrk"]
    errors = sum(x[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
    cpu = None
    if r["proxy_cpu_ticks"] is not None and x["requests"]:
        cpu = r["proxy_cpu_ticks"] * TICK_US / x["requests"]
    wrk[r["test"]][r["path"]].append({"rps": x["requests"] / (x["duration_us"] / 1e6), "p50": x["p50_us"],
                                      "p99": x["p99_us"], "errors": errors, "cpu": cpu, "round": r["round"]})

LABEL = {
    "get_c1": "GET /v1/models, 1 conn.",
    "get_c16": "GET /v1/models, 16 conn.",
    "get_c128": "GET /v1/models, 128 conn.",
    "post_c1": "POST chat (small JSON), 1 conn.",
    "post_c16": "POST chat (small JSON), 16 conn.",
    "post_c128": "POST chat (small JSON), 128 conn.",
    "upload_c1": "POST 1 MiB upload, 1 conn.",
    "upload_c16": "POST 1 MiB upload, 16 conn.",
}

summary = {}
for t in tests:
    summary[t] = {}
    for p in REQ_PATHS:
        runs = wrk[t][p]
        if runs:
            cpus = [r["cpu"] for r in runs if r["cpu"] is not None]
            summary[t][p] = {
                "rps": med([r["rps"] for r in runs]), "rps_all": [r["rps"] for r in runs],
                "p50": med([r["p50"] for r in runs]),
                "p99": med([r["p99"] for r in runs]), "p99_all": [r["p99"] for r in runs],
                "errors": sum(r["errors"] for r in runs), "cpu": med(cpus) if cpus else None,
            }



def pair(a_path, n_path):
    """a_path against n_path round by round: both ran within seconds of each other in a round."""
    out = {}
    for t in tests:
        by_round = {p: {r["round"]: r for r in wrk[t][p]} for p in (a_path, n_path)}
        pairs = [(by_round[a_path][k], by_round[n_path][k]) for k in sorted(set(by_round[a_path]) & set(by_round[n_path]))]
        pairs = [(a, n) for a, n in pairs if n["rps"] > 0]
        if pairs:
            ratios = [a["rps"] / n["rps"] for a, n in pairs]
            out[t] = {
                "n": len(pairs),
                "ratio": med(ratios),
                "ratios": ratios,
                "more": sum(1 for a, n in pairs if a["rps"] > n["rps"]),
                "lower": sum(1 for a, n in pairs if a["p99"] < n["p99"]),
            }
    return out


paired = pair("agent", "nginx")
paired_key = pair("agent_key", "nginx")
key_vs_agent = pair("agent_key", "agent")

# ------------------------------------------------------------------ streams
streams = defaultdict(list)
for r in rows:
    if r["kind"] == "stream":
        d = r["data"]
        gaps = [abs(g - meta["stream_ms"]) for g in d["gap_ms"]]
        streams[r["path"]].append({
            "ttfb50": med(d["ttfb_ms"]), "ttfb99": pct(d["ttfb_ms"], 99),
            "delay50": med(d["delay_ms"]) if d["delay_ms"] else float("nan"),
            "delay99": pct(d["delay_ms"], 99),
            "jitter99": pct(gaps, 99), "events": d["events"],
        })
st = {}
for p in PATHS:
    runs = streams.get(p, [])
    if runs:
        st[p] = {k: med([r[k] for r in runs]) for k in ("ttfb50", "ttfb99", "delay50", "delay99", "jitter99")}
        st[p]["ttfb50_all"] = [r["ttfb50"] for r in runs]
        st[p]["events"] = sum(r["events"] for r in runs)

holds = {r["path"]: r for r in rows if r["kind"] == "hold"}
hyper = {r["command"]: r for r in rows if r["kind"] == "hyperfine"}
burst = next((r for r in rows if r["kind"] == "burst"), None)
settled = meta["agent_settled_kib"]


def opened(hold):
    return int(hold["client"].split("open=")[1].split()[0]) if "open=" in hold["client"] else 0


# ------------------------------------------------------------------ the bars, as SPEC section 7 words them
bars = []  # (short name, the bar, figure, verdict)


def geomean(pd):
    return math.exp(statistics.fmean(math.log(pr["ratio"]) for pr in pd.values())) if pd else None


def request_bars(pd, path, suffix, who):
    """The throughput and p99 bars of `path` against nginx, from pair(path, "nginx")."""
    if not pd:
        return
    g = geomean(pd)
    worst = min(pd, key=lambda t: pd[t]["ratio"])
    bars.append((
        "throughput" + suffix, f"Throughput{who}: geometric mean over the cells of the median {path}/nginx ratio ≥ 1.0, no cell's < 0.95",
        f"geometric mean {g:.3f}; lowest cell {worst} {pd[worst]['ratio']:.3f}",
        verdict(g >= 1.0 and pd[worst]["ratio"] >= 0.95)))
    short = [t for t, pr in pd.items() if 2 * pr["lower"] < pr["n"]]
    bars.append((
        "p99" + suffix, f"p99 added{who}: in every cell {'the agent' if path == 'agent' else path}'s p99 below nginx's in at least half the rounds",
        "every cell" if not short else "missed in " + ", ".join(f"{t} ({pd[t]['lower']} of {pd[t]['n']})" for t in short),
        verdict(not short)))


geo = geomean(paired)
request_bars(paired, "agent", "", "")
request_bars(paired_key, "agent_key", " (require_key)", " with `require_key` (agent_key)")
if {"agent", "nginx", "direct"} <= st.keys():
    added = st["agent"]["ttfb50"] - st["direct"]["ttfb50"]
    added_nginx = st["nginx"]["ttfb50"] - st["direct"]["ttfb50"]
    bars.append((
        "streaming TTFB", "Streaming time-to-first-byte added: median < 1 ms and ≤ nginx's + 0.1 ms",
        f"agent {added:.3f} ms, nginx {added_nginx:.3f} ms",
        verdict(added < 1.0 and added <= added_nginx + 0.1)))
fresh = max(meta["agent_idle_kib"], meta["agent_sse_idle_kib"])
bars.append(("idle RSS", "Memory: RSS < 15 MiB idle", f"{mib(meta['agent_idle_kib'])} (the streams' agent: {mib(meta['agent_sse_idle_kib'])})",
             verdict(fresh < 15 * MIB)))
bars.append(("RSS after load", "Memory: RSS < 15 MiB idle again after load",
             f"{mib(settled)}, {meta['settled_after_s']} s after the request cells", verdict(settled < 15 * MIB)))
if {"agent", "nginx"} <= holds.keys():
    ha, hn = holds["agent"], holds["nginx"]
    all_open = opened(ha) == ha["streams"] and opened(hn) == hn["streams"]
    bars.append(("RSS with streams", f"Memory: RSS with {ha['streams']:,} open streams ≤ nginx's",
                 f"agent {mib(ha['rss_kib'])}, nginx {mib(hn['rss_kib'])}"
                 + ("" if all_open else f" (streams open: agent {opened(ha)}, nginx {opened(hn)})"),
                 verdict(all_open and ha["rss_kib"] <= hn["rss_kib"])))
if "behest-agent" in hyper:
    tok = hyper["behest-agent"]
    bars.append(("`token`", "`behest-agent token` against a running daemon: median ≤ 5 ms", f"{tok['median_s'] * 1e3:.2f} ms",
                 verdict(tok["median_s"] <= 0.005)))
if burst:
    ok200 = burst["statuses"].get("200", 0)
    in_flight = burst.get("grants_when_written") == 0
    fig = f"{burst['grants']} grant(s); {ok200:,} of {burst['requests']:,} answered 200"
    if burst.get("grants_when_written") is None:
        fig += "; the IdP's grant count could not be read while the burst was in flight"
    elif not in_flight:
        fig += "; the grant was answered before the burst was written (raise BURST_GRANT_DELAY_MS)"
    bars.append(("one grant", f"{burst['requests']:,} concurrent requests, no token cached: exactly one grant", fig,
                 verdict(in_flight and burst["grants"] == 1 and ok200 == burst["requests"])))

# ------------------------------------------------------------------ write
out = []
w = out.append
w("# Benchmarks")
w("")
w(f"Generated by `bench/run.sh` on {meta['date']} from commit `{meta['git']}` in {meta['elapsed_s'] // 60} min "
  f"{meta['elapsed_s'] % 60} s. Do not edit by hand: run it again.")
w("")
w("```sh")
knobs = "".join(f"{k}={meta[m]} " for k, m, default in (
    ("ROUNDS", "rounds", 9), ("DURATION", "duration_s", 4), ("HOLD_STREAMS", "hold_streams", 1000), ("BURST", "burst", 1000))
    if meta.get(m, default) != default)
w(f"{knobs}bench/run.sh")
w("```")
w("")
w("## Machine and method")
w("")
mem_kib = int(meta["mem"].split()[0]) if meta["mem"].split()[0].isdigit() else None
w(f"- {meta['cpu']}, **{meta['nproc']} cores**, {f'{mem_kib / MIB / MIB:.1f} GiB' if mem_kib else meta['mem']} memory, kernel {meta['kernel']}. Pinned with "
  f"`taskset`: {meta['pinning']}.")
w(f"- {meta['agent_version']} (`cargo build --release`, the binary the Debian package contains), nginx {meta['nginx']}, "
  f"wrk {meta['wrk']}, node {meta['node']}, hyperfine {meta['hyperfine']}. The agent runs one event-loop thread "
  f"({meta['agent_threads']} threads in all), nginx `worker_processes 1`.")
w("- Paths: **direct** (client → upstream with the real bearer), **agent** (client → `behest-agent run` → upstream, "
  "the client sending `Bearer placeholder`), in the request cells **agent_key** (a second agent configured the same "
  "but with `proxy.require_key = true`, the client sending a local key from `behest-agent key create`), **nginx** (client → nginx → upstream: `proxy_pass` to a keep-alive pool "
  f"of {meta['nginx_keepalive']}, `proxy_set_header Authorization` with a token of the same IdP, an `X-Request-Id`, "
  "no buffering; `bench/nginx-proxy.conf.in`).")
w("- Upstreams: nginx answering from memory for the request cells (`bench/nginx-upstream.conf.in`); for streams, "
  "devkit's echo upstream, and devkit's IdP for the tokens, both served by `bench-servers` (`bench/src/main.rs`), "
  "the same code as `behest-agent dev` and the tests. The agent verifies every token it gets, as in production.")
w("- The agent runs with usage accounting on, as shipped (SPEC §8): every `POST` chat response's `usage` is read as it "
  "passes, counted per session and model, exported as metrics and appended to a ledger file; so the request cells "
  "below are also SPEC §7's \"accounting on\" cells.")
w(f"- {n_of(meta['rounds'], 'round')}; in each, every request cell runs on the {len(REQ_PATHS)} paths back to back ({meta['duration_s']} s "
  "of wrk each, the order rotated every round), after a 1 s warm-up of each. The agent and nginx are compared round "
  "by round; other figures are medians over the rounds (p99: the median of the rounds' p99), *spread* the lowest "
  "and highest round.")
foreign = [r["foreign"] for r in rows if r["kind"] in ("wrk", "stream") and r.get("foreign") is not None]
steal = [r["steal"] for r in rows if r["kind"] in ("wrk", "stream") and r.get("steal") is not None]
repeated = sum(1 for r in rows if r["kind"] == "wrk" and r.get("attempts", 1) > 1)
if foreign:
    w(f"- Other work on the machine during the measured runs (CPU outside the benchmark's processes, share of the "
      f"machine): median {med(foreign):.1%}, highest {max(foreign):.1%}; steal median {med(steal):.1%}. A run above "
      f"{meta['foreign_max']:.0%} is repeated after a quiet moment: {n_of(repeated, 'wrk run')} {'was' if repeated == 1 else 'were'}.")
w("")
w("## SPEC §7 verdicts")
w("")
if meta["rounds"] < 9:
    w(f"Only {n_of(meta['rounds'], 'round')}: SPEC §7 judges over at least 9, so these verdicts do not count.")
    w("")
w("| bar | figure | verdict |")
w("|---|---|---|")
for _, name, fig, v in bars:
    w(f"| {name} | {fig} | {v} |")
w("")
if tests:
    w("## Requests (wrk)")
    w("")
    w("| cell | path | req/s (spread) | p50 ms | p99 ms (spread) | proxy CPU µs/req | errors |")
    w("|---|---|---:|---:|---:|---:|---:|")
    for t in tests:
        for p in REQ_PATHS:
            x = summary[t].get(p)
            if x:
                cpu = f"{x['cpu']:.0f}" if x["cpu"] is not None else "–"
                w(f"| {LABEL.get(t, t)} | {p} | {x['rps']:,.0f} ({spread(x['rps_all'], lambda v: f'{v:,.0f}')}) | "
                  f"{ms(x['p50'])} | {ms(x['p99'])} ({spread(x['p99_all'], ms)}) | {cpu} | {x['errors']} |")
    w("")
    w("The agent (and agent_key) against nginx, round by round: the median of the rounds' req/s ratios "
      "(lowest–highest), the rounds in which it served more and had the lower p99; then the p99 each proxy adds over "
      "direct (medians). *Proxy CPU*: the proxy's user+system time over the requests served (nginx: master and worker).")
    w("")
    w("| cell | agent/nginx req/s | served more | p99 lower | agent_key/nginx req/s | served more | p99 lower | "
      "p99 added: agent | agent_key | nginx |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def cmp(pr):
        if not pr:
            return "– | – | –"
        return (f"{pr['ratio']:.3f} ({spread(pr['ratios'], lambda v: f'{v:.2f}')}) | {pr['more']} of {pr['n']} | "
                f"{pr['lower']} of {pr['n']}")

    for t in tests:
        if t not in paired and t not in paired_key:
            continue
        s = summary[t]
        d = s.get("direct")
        add = lambda p: f"{ms(s[p]['p99'] - d['p99'])} ms" if d and p in s else "–"
        w(f"| {t} | {cmp(paired.get(t))} | {cmp(paired_key.get(t))} | {add('agent')} | {add('agent_key')} | {add('nginx')} |")
    w("")
if st:
    w("## Streaming (server-sent events)")
    w("")
    w(f"{meta['streams']} streams per path per round, one after another on a keep-alive connection, each "
      f"{meta['stream_events']} content events (and devkit's role, stop and `[DONE]` events) {meta['stream_ms']} ms "
      "apart. TTFB: request written → first byte read. Event delay: the upstream handed the event to its connection → "
      "the client read it (both on the machine's wall clock). Jitter: |gap between events read − interval|.")
    w("")
    w("| path | TTFB p50 ms (spread) | TTFB p99 ms | TTFB added p50 | event delay p50 / p99 ms | gap jitter p99 ms | events |")
    w("|---|---:|---:|---:|---:|---:|---:|")
    for p in PATHS:
        x = st.get(p)
        if x:
            added = f"{x['ttfb50'] - st['direct']['ttfb50']:+.3f}" if "direct" in st else "–"
            w(f"| {p} | {x['ttfb50']:.3f} ({spread(x['ttfb50_all'], lambda v: f'{v:.3f}')}) | {x['ttfb99']:.3f} | "
              f"{added} | {x['delay50']:.3f} / {x['delay99']:.3f} | {x['jitter99']:.3f} | {x['events']:,} |")
    w("")
w("## Memory (VmRSS)")
w("")
w(f"| process | idle | after the request cells (peak) | idle {meta['settled_after_s']} s after them | "
  f"{meta['hold_streams']:,} open streams | after they closed |")
w("|---|---:|---:|---:|---:|---:|")
ha, hn = holds.get("agent"), holds.get("nginx")


def held(h):
    return f"{mib(h['rss_kib'])} ({h['client'].replace('READY ', '')}) | {mib(h['rss_after_kib'])} |" if h else "– | – |"


w(f"| behest-agent | {mib(meta['agent_idle_kib'])} | {mib(meta['agent_after_load_kib'])} "
  f"({mib(meta['agent_after_load_hwm_kib'])}) | {mib(settled)} | " + held(ha))
w(f"| nginx (master + worker) | {mib(meta['nginx_idle_kib'])} | – | – | " + held(hn))
w("")
w("Idle: right after the first token. The streams are held by the second agent (idle: "
  f"{mib(meta['agent_sse_idle_kib'])}) and by the nginx proxy, in turn, each stream an event a second.")
w("")
if hyper:
    w("## `behest-agent token` (hyperfine, daemon running)")
    w("")
    w("| command | median ms | mean ± σ ms | min ms | max ms | runs |")
    w("|---|---:|---:|---:|---:|---:|")
    for name, label in (("behest-agent", "`behest-agent token`"), ("cat", "`cat token.txt` (the floor)")):
        h = hyper.get(name)
        if h:
            w(f"| {label} | {h['median_s'] * 1e3:.2f} | {h['mean_s'] * 1e3:.2f} ± {h['stddev_s'] * 1e3:.2f} | "
              f"{h['min_s'] * 1e3:.2f} | {h['max_s'] * 1e3:.2f} | {h['runs']} |")
    w("")
if burst:
    w("## A burst on an empty cache")
    w("")
    w(f"A fresh agent (no disk cache) whose first grant the IdP answers {burst['grant_delay_ms']} ms late; "
      f"{burst['requests']:,} concurrent requests, one connection each, all written within {burst['written_ms']} ms "
      f"(grants issued by then: {burst['grants_when_written']}). Grants during the burst: **{burst['grants']}** "
      f"(token requests: {burst['token_requests']}; the agent's `grants_ok`: {burst['agent_grants_ok']}). Responses: "
      f"{', '.join(f'{k}: {v}' for k, v in sorted(burst['statuses'].items()))}; the first {burst['first_answer_ms']} ms, "
      f"the last {burst['last_answer_ms']} ms after the first request was sent.")
    w("")

# ------------------------------------------------------------------ reading, from the figures
w("## Reading")
w("")
if paired:
    best = max(paired, key=lambda t: paired[t]["ratio"])
    worst = min(paired, key=lambda t: paired[t]["ratio"])
    w(f"- Throughput: the agent served {geo:.2f}× nginx's requests per second over the cells (geometric mean); "
      f"{best} was its best cell ({paired[best]['ratio']:.2f}×), {worst} its worst ({paired[worst]['ratio']:.2f}×).")
    lower = sum(1 for pr in paired.values() if 2 * pr["lower"] >= pr["n"])
    w(f"- p99: the agent's was below nginx's in at least half the rounds in {lower} of {len(paired)} cells.")
if key_vs_agent:
    kr = [pr["ratio"] for pr in key_vs_agent.values()]
    dcpu = [summary[t]["agent_key"]["cpu"] - summary[t]["agent"]["cpu"] for t in key_vs_agent
            if summary[t]["agent_key"]["cpu"] is not None and summary[t]["agent"]["cpu"] is not None]
    w(f"- Local keys: with `require_key` the agent served {med(kr):.2f}× its plain req/s (median over the cells of "
      f"each cell's median agent_key/agent round ratio; cells {min(kr):.2f}–{max(kr):.2f})"
      + (f", at {med(dcpu):+.1f} µs CPU per request (median over the cells; {min(dcpu):+.1f} to {max(dcpu):+.1f})."
         if dcpu else "."))
if {"agent", "nginx", "direct"} <= st.keys():
    d = st["direct"]
    w(f"- Streaming: {st['agent']['ttfb50'] - d['ttfb50']:.3f} ms added to the first byte by the agent, "
      f"{st['nginx']['ttfb50'] - d['ttfb50']:.3f} ms by nginx; the median event arrived "
      f"{st['agent']['delay50'] - d['delay50']:+.3f} ms (agent) and {st['nginx']['delay50'] - d['delay50']:+.3f} ms "
      "(nginx) later than directly.")
if ha and hn:
    per = lambda h: (h["rss_kib"] - h["rss_before_kib"]) / max(1, opened(h))
    w(f"- Memory: {mib(meta['agent_idle_kib'])} idle and {mib(settled)} idle after load; with "
      f"{ha['streams']:,} streams the agent held {mib(ha['rss_kib'])} against nginx's {mib(hn['rss_kib'])} "
      f"({per(ha):.1f} and {per(hn):.1f} KiB per stream).")
if foreign:
    busy = max(foreign) > meta["foreign_max"]
    w(f"- Noise: other work used a median {med(foreign):.1%} of the machine during the measured runs"
      + (f", up to {max(foreign):.1%}: a close verdict from this run is worth repeating on a quiet machine."
         if busy else "; the run was quiet."))
missed = [short for short, _, _, v in bars if v != "met"]
w(f"- Bars missed: {len(missed)} of {len(bars)}" + (f" ({', '.join(missed)})." if missed else "."))
w("")

if len(out) > MAX_LINES:
    print(f"summarize.py: {len(out)} lines, more than {MAX_LINES}", file=sys.stderr)
print("\n".join(out))
