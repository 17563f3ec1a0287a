#!/usr/bin/env node
// Streaming client for the benchmark, against devkit's echo upstream (bench-servers) directly or
// through a proxy. Two modes:
//
//   measure --url URL --control IDP_URL [--auth VALUE] [--streams K] [--events N]
//     K streamed chat completions one after another on one keep-alive connection (after one
//     warm-up stream), each asking for N content events (`x-echo-events`; the upstream adds the
//     role, stop and [DONE] events). Each stream is tagged (`x-bench-tag`); once all are done, the
//     upstream's send time of every event is read from IDP_URL/bench/sse-sent. Prints one JSON
//     line: ttfb_ms (request written -> first body byte, per stream), delay_ms (event handed to
//     the upstream's connection -> read here, per event; both clocks are the machine's wall clock),
//     gap_ms (between consecutive events read, per gap).
//
//   hold --url URL [--auth VALUE] [--streams K] [--hold-s S] [--ready-timeout-s T]
//     opens K streams at once (`x-bench-hold`: the upstream paces them an event a second), prints
//     "READY open=K ..." once every one has its first event (or "READY open=J ... timeout" after
//     T s), keeps them open S seconds, then closes them and exits.
'use strict';
const http = require('http');
const crypto = require('crypto');
const { performance } = require('perf_hooks');

const mode = process.argv[2];
function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}
const target = new URL(arg('url'));
const auth = arg('auth', '');
// Wall clock with sub-millisecond resolution, comparable with the upstream's SystemTime stamps.
const wall = () => performance.timeOrigin + performance.now();
// A reply long enough that every content event carries some of it.
const BODY = JSON.stringify({
  model: 'echo-1',
  stream: true,
  messages: [{ role: 'user', content: 'The quick brown fox jumps over the lazy dog. '.repeat(4) }],
});

// Sends one streamed completion; onEvent(readAt) per event, onFirstByte(readAt) once. Resolves
// when the stream ends. `open.lastReq` is the request, `_started` when it was handed to the socket.
function open(agent, headers, onEvent, onFirstByte) {
  return new Promise((resolve, reject) => {
    const h = {
      'content-type': 'application/json',
      accept: 'text/event-stream',
      'content-length': Buffer.byteLength(BODY),
      ...headers,
    };
    if (auth) h.authorization = auth;
    const req = http.request(
      { host: target.hostname, port: target.port, method: 'POST', path: target.pathname, headers: h, agent },
      (res) => {
        if (res.statusCode !== 200) {
          res.resume();
          return reject(new Error(`status ${res.statusCode}`));
        }
        let buf = '';
        let first = true;
        res.setEncoding('utf8');
        res.on('data', (chunk) => {
          const at = wall();
          if (first) {
            first = false;
            onFirstByte(at);
          }
          buf += chunk;
          let cut;
          while ((cut = buf.indexOf('\n\n')) >= 0) {
            buf = buf.slice(cut + 2);
            onEvent(at);
          }
        });
        res.on('end', () => resolve());
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req._started = wall();
    req.end(BODY);
    open.lastReq = req;
  });
}

function getJson(url) {
  return new Promise((resolve, reject) => {
    http
      .get(url, (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (c) => (text += c));
        res.on('end', () => {
          try {
            resolve(JSON.parse(text));
          } catch (e) {
            reject(new Error(`${url}: ${res.statusCode} ${text.slice(0, 200)}`));
          }
        });
      })
      .on('error', reject);
  });
}

async function measure() {
  const streams = Number(arg('streams', '10'));
  const events = Number(arg('events', '20'));
  const control = arg('control');
  const run = crypto.randomBytes(6).toString('hex');
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const out = { ttfb_ms: [], delay_ms: [], gap_ms: [], events: 0 };
  const reads = {};
  for (let s = -1; s < streams; s++) {
    const record = s >= 0;
    const tag = `${run}-${s}`;
    const at = [];
    let t0 = 0;
    const p = open(
      agent,
      { 'x-echo-events': String(events), 'x-bench-tag': tag },
      (readAt) => at.push(readAt),
      (readAt) => {
        if (record) out.ttfb_ms.push(readAt - t0);
      },
    );
    t0 = open.lastReq._started;
    await p;
    if (!record) continue;
    reads[tag] = at;
    for (let i = 1; i < at.length; i++) out.gap_ms.push(at[i] - at[i - 1]);
    out.events += at.length;
  }
  agent.destroy();
  if (control) {
    const sent = await getJson(new URL(`/bench/sse-sent?prefix=${run}`, control));
    for (const [tag, at] of Object.entries(reads)) {
      const from = sent[tag] || [];
      if (from.length !== at.length) {
        throw new Error(`stream ${tag}: ${at.length} events read, ${from.length} sent`);
      }
      for (let i = 0; i < at.length; i++) out.delay_ms.push(at[i] - from[i]);
    }
  }
  process.stdout.write(JSON.stringify(out) + '\n');
}

async function hold() {
  const streams = Number(arg('streams', '1000'));
  const holdS = Number(arg('hold-s', '5'));
  const readyTimeout = Number(arg('ready-timeout-s', '30'));
  const agent = new http.Agent({ keepAlive: false, maxSockets: Infinity });
  let ready = 0;
  let failed = 0;
  const reqs = [];
  const t0 = Date.now();
  let announce;
  const allReady = new Promise((r) => (announce = r));
  for (let i = 0; i < streams; i++) {
    open(agent, { 'x-echo-events': '1000000', 'x-bench-hold': '1' }, () => {}, () => {
      ready += 1;
      if (ready + failed === streams) announce();
    }).catch(() => {
      failed += 1;
      if (ready + failed === streams) announce();
    });
    reqs.push(open.lastReq);
  }
  const timedOut = await Promise.race([
    allReady.then(() => false),
    new Promise((r) => setTimeout(() => r(true), readyTimeout * 1000)),
  ]);
  process.stdout.write(
    `READY open=${ready} failed=${failed} after_ms=${Date.now() - t0}${timedOut ? ' timeout' : ''}\n`,
  );
  await new Promise((r) => setTimeout(r, holdS * 1000));
  for (const r of reqs) r.destroy();
  agent.destroy();
  process.exit(0);
}

if (mode === 'measure') measure().catch((e) => { console.error(e.message); process.exit(1); });
else if (mode === 'hold') hold().catch((e) => { console.error(e.message); process.exit(1); });
else {
  console.error('usage: stream_client.js measure|hold --url URL [...]');
  process.exit(2);
}
