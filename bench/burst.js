#!/usr/bin/env node
// The "1,000 requests on an empty cache" figure: fires K concurrent requests (one connection
// each) at a fresh agent whose first grant the IdP answers late (bench/run.sh asks bench-servers
// for that), then reads the IdP's grant count once every request is written: none issued since
// the burst began means it arrived while the grant was in flight, as the figure needs. Prints one JSON line with the
// status counts and the times taken.
//
//   node bench/burst.js --url URL --control IDP_URL [--requests K] [--settle-ms MS]
'use strict';
const http = require('http');

function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}
const target = new URL(arg('url'));
const control = arg('control');
const count = Number(arg('requests', '1000'));
const settle = Number(arg('settle-ms', '300'));
const BODY = JSON.stringify({ model: 'echo-1', messages: [{ role: 'user', content: 'hello' }] });

function grants() {
  return new Promise((resolve) => {
    http
      .get(new URL('/bench/stats', control), (res) => {
        let text = '';
        res.on('data', (c) => (text += c));
        res.on('end', () => {
          try {
            resolve(JSON.parse(text).grants);
          } catch (e) {
            resolve(null);
          }
        });
      })
      .on('error', () => resolve(null));
  });
}

async function main() {
  const agent = new http.Agent({ keepAlive: false, maxSockets: Infinity });
  const grantsBefore = await grants();
  let written = 0;
  let allWritten;
  const writtenP = new Promise((r) => (allWritten = r));
  let firstAnswer = null;
  let lastAnswer = null;
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
            if (firstAnswer === null) firstAnswer = Date.now() - t0;
            res.resume();
            res.on('end', () => {
              lastAnswer = Date.now() - t0;
              resolve(res.statusCode);
            });
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
  // Let the agent read every head and park each request on the grant in flight, then check that
  // the grant is still in flight.
  await new Promise((r) => setTimeout(r, settle));
  const grantsAfter = await grants();
  const grantsWhenWritten = grantsBefore === null || grantsAfter === null ? null : grantsAfter - grantsBefore;
  const statuses = await Promise.all(results);
  const counts = {};
  for (const s of statuses) counts[s] = (counts[s] || 0) + 1;
  process.stdout.write(
    JSON.stringify({
      requests: count,
      written_ms: writtenMs,
      write_timeout: timedOut,
      grants_when_written: grantsWhenWritten,
      first_answer_ms: firstAnswer,
      last_answer_ms: lastAnswer,
      statuses: counts,
    }) + '\n',
  );
  agent.destroy();
}
main();
