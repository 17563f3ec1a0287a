#!/usr/bin/env node
// Streaming client for the benchmark, two modes:
//
//   measure --url URL [--auth VALUE] [--streams K] [--events N] [--ms M]
//     K streamed chat completions one after another on one keep-alive connection (after one
//     warm-up stream), each asking bench/sse.js for N events M ms apart. Prints one JSON line:
//     ttfb_ms (request written -> first body byte, per stream), delay_ms (event written by the
//     upstream -> event read here, per event), gap_ms (between consecutive events, per gap).
//
//   hold --url URL [--auth VALUE] [--streams K] [--hold-s S] [--ready-timeout-s T]
//     opens K streams at once, prints "READY open=K ..." once every one has its first event (or
//     "READY open=J ... timeout" after T s), keeps them open S seconds, then closes them and exits.
'use strict';
const http = require('http');
const { performance } = require('perf_hooks');

const mode = process.argv[2];
function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}
const target = new URL(arg('url'));
const auth = arg('auth', '');
const wall = () => performance.timeOrigin + performance.now();
const BODY = JSON.stringify({
  model: 'echo-1',
  stream: true,
  messages: [{ role: 'user', content: 'hello' }],
});

function open(agent, events, ms, onEvent, onFirstByte) {
  return new Promise((resolve, reject) => {
    const headers = {
      'content-type': 'application/json',
      accept: 'text/event-stream',
      'content-length': Buffer.byteLength(BODY),
    };
    if (auth) headers.authorization = auth;
    const req = http.request(
      {
        host: target.hostname,
        port: target.port,
        method: 'POST',
        path: `${target.pathname}?n=${events}&ms=${ms}`,
        headers,
        agent,
      },
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
            const ev = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            const m = /"t":([0-9.]+)/.exec(ev);
            if (m) onEvent(at, Number(m[1]));
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

async function measure() {
  const streams = Number(arg('streams', '10'));
  const events = Number(arg('events', '20'));
  const ms = Number(arg('ms', '20'));
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const out = { ttfb_ms: [], delay_ms: [], gap_ms: [] };
  for (let s = -1; s < streams; s++) {
    let prev = null;
    let t0 = 0;
    const record = s >= 0;
    const p = open(
      agent,
      events,
      ms,
      (at, sentAt) => {
        if (!record) return;
        out.delay_ms.push(at - sentAt);
        if (prev !== null) out.gap_ms.push(at - prev);
        prev = at;
      },
      (at) => {
        if (record) out.ttfb_ms.push(at - t0);
      },
    );
    t0 = open.lastReq._started;
    await p;
  }
  agent.destroy();
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
    open(agent, 100000, 1000, () => {}, () => {
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
