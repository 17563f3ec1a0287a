#!/usr/bin/env node
// The "1,000 requests on an empty cache" figure: fires K concurrent requests (one connection
// each) at the proxy while the stub IdP holds the agent's first grant, releases the grant once
// every request is written, and prints one JSON line with the status counts and the time taken.
//
//   node bench/burst.js --url URL --idp IDP_BASE_URL [--requests K] [--settle-ms MS]
'use strict';
const http = require('http');

function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}
const target = new URL(arg('url'));
const idp = new URL(arg('idp'));
const count = Number(arg('requests', '1000'));
const settle = Number(arg('settle-ms', '300'));
const BODY = JSON.stringify({ model: 'echo-1', messages: [{ role: 'user', content: 'hello' }] });

function post(url, body, agent) {
  return new Promise((resolve) => {
    const req = http.request(
      {
        host: url.hostname,
        port: url.port,
        method: 'POST',
        path: url.pathname,
        agent,
        headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body || '') },
      },
      (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode));
      },
    );
    req.on('error', (e) => resolve(`error:${e.code || e.message}`));
    req.end(body || '');
  });
}

async function main() {
  const agent = new http.Agent({ keepAlive: false, maxSockets: Infinity });
  let written = 0;
  let allWritten;
  const writtenP = new Promise((r) => (allWritten = r));
  const t0 = Date.now();
  const results = [];
  for (let i = 0; i < count; i++) {
    results.push(
      new Promise((resolve) => {
        const req = http.request(
          {
            host: target.hostname,
            port: target.port,
            method: 'POST',
            path: target.pathname,
            agent,
            headers: {
              'content-type': 'application/json',
              authorization: 'Bearer placeholder',
              'content-length': Buffer.byteLength(BODY),
            },
          },
          (res) => {
            res.resume();
            res.on('end', () => resolve(res.statusCode));
          },
        );
        req.on('finish', () => {
          written += 1;
          if (written === count) allWritten();
        });
        req.on('error', (e) => resolve(`error:${e.code || e.message}`));
        req.setTimeout(60000, () => req.destroy(new Error('timeout')));
        req.end(BODY);
      }),
    );
  }
  const timedOut = await Promise.race([
    writtenP.then(() => false),
    new Promise((r) => setTimeout(() => r(true), 30000)),
  ]);
  const writtenMs = Date.now() - t0;
  // Let the agent read every head and park each request on the grant in flight.
  await new Promise((r) => setTimeout(r, settle));
  await post(new URL('/admin/release', idp), '', undefined);
  const statuses = await Promise.all(results);
  const counts = {};
  for (const s of statuses) counts[s] = (counts[s] || 0) + 1;
  process.stdout.write(
    JSON.stringify({ requests: count, written_ms: writtenMs, write_timeout: timedOut, total_ms: Date.now() - t0, statuses: counts }) + '\n',
  );
  agent.destroy();
}
main();
