#!/usr/bin/env node
// The training run for the profile-guided release build (pgo/build.sh): an instrumented
// behest-agent serves what it serves in production, so its profile says which code is hot. Only
// Node.js's standard library; nothing from npm.
//
//   node pgo/train.js --agent PATH [--seconds S]
//
// Starts bench/idp.js (the stub Auth0-compatible IdP), an OpenAI-style upstream in this process
// (JSON answers, server-sent events, uploads; 401 without a bearer, like Behest), and
// `PATH run` in front of it, then sends, through the agent, with the placeholder bearer a client
// sends: small GETs and POSTs on 64 keep-alive connections and on one, streamed completions,
// 1 MiB uploads, a few requests over h2c; then runs `PATH token` and `PATH status` against the
// daemon. Every answer must be a 200 with the upstream's body, or the run fails: a profile of
// error paths would make a slow binary. Stops the agent with SIGTERM, so it writes its profile.
// S (default 8) is the length of the main phase; the others scale with it.
'use strict';
const fs = require('fs');
const http = require('http');
const http2 = require('http2');
const net = require('net');
const os = require('os');
const path = require('path');
const { spawn, execFileSync } = require('child_process');

function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  if (i >= 0 && i + 1 < process.argv.length) return process.argv[i + 1];
  if (dflt === undefined) {
    console.error(`train.js: --${name} is required`);
    process.exit(2);
  }
  return dflt;
}
const agentBin = path.resolve(arg('agent'));
const seconds = Number(arg('seconds', '8'));

const MODELS = JSON.stringify({ object: 'list', data: [{ id: 'echo-1', object: 'model', created: 0, owned_by: 'train' }] });
const COMPLETION = JSON.stringify({
  id: 'chatcmpl-train',
  object: 'chat.completion',
  created: 0,
  model: 'echo-1',
  choices: [{ index: 0, message: { role: 'assistant', content: 'Hello there, how are you?' }, finish_reason: 'stop' }],
  usage: { prompt_tokens: 21, completion_tokens: 7, total_tokens: 28 },
});
const FILE = JSON.stringify({ id: 'file-train', object: 'file', bytes: 1048576, filename: 'upload.bin', purpose: 'batch' });
const CHAT = JSON.stringify({ model: 'echo-1', messages: [{ role: 'user', content: 'hello' }] });
const CHAT_STREAM = JSON.stringify({ model: 'echo-1', stream: true, messages: [{ role: 'user', content: 'hello' }] });
const UPLOAD = Buffer.alloc(1024 * 1024, 7);
const STREAM_EVENTS = 12;

function send(res, status, body, type = 'application/json') {
  res.writeHead(status, { 'content-type': type, 'content-length': Buffer.byteLength(body) });
  res.end(body);
}

// The upstream: what an OpenAI-compatible server answers, for the requests below.
function upstream(req, res) {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    if (!(req.headers.authorization || '').startsWith('Bearer ey')) {
      return send(res, 401, '{"error":{"message":"missing bearer","type":"invalid_request_error","code":"invalid_api_key"}}');
    }
    const route = `${req.method} ${req.url}`;
    if (route === 'GET /v1/models') return send(res, 200, MODELS);
    if (route === 'POST /v1/files') return send(res, 200, FILE);
    if (route === 'POST /v1/chat/completions') {
      if (!Buffer.concat(chunks).includes('"stream":true')) return send(res, 200, COMPLETION);
      res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
      let n = 0;
      const tick = () => {
        if (n === STREAM_EVENTS) return res.end('data: [DONE]\n\n');
        const delta = { id: 'chatcmpl-train', object: 'chat.completion.chunk', choices: [{ index: 0, delta: { content: `t${n}` } }] };
        res.write(`data: ${JSON.stringify(delta)}\n\n`);
        n += 1;
        setTimeout(tick, 1);
      };
      return tick();
    }
    send(res, 404, '{"error":{"message":"no such route","type":"invalid_request_error"}}');
  });
}

function listen(server) {
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server.address().port)));
}

async function freePort() {
  const s = net.createServer();
  const port = await listen(s);
  await new Promise((r) => s.close(r));
  return port;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function until(what, check, ms = 20000) {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await check().catch(() => false)) return;
    if (Date.now() > deadline) throw new Error(`${what} did not come up within ${ms} ms`);
    await sleep(50);
  }
}

function request(agent, port, method, urlPath, body) {
  return new Promise((resolve, reject) => {
    const headers = { authorization: 'Bearer placeholder' };
    if (body) {
      headers['content-type'] = 'application/json';
      headers['content-length'] = body.length;
    }
    const req = http.request({ host: '127.0.0.1', port, method, path: urlPath, agent, headers }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString() }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

// Runs `conns` request loops on keep-alive connections for `ms` (or `count` requests in all);
// each loop calls next(i) for its i-th request. Every answer must be a 200 carrying `expect`.
async function load(name, port, conns, { ms, count }, next) {
  const agent = new http.Agent({ keepAlive: true, maxSockets: conns });
  const deadline = Date.now() + (ms || 1e9);
  let done = 0;
  let started = 0;
  const loop = async () => {
    for (let i = 0; Date.now() < deadline && (count === undefined || started < count); i++) {
      started += 1;
      const [method, urlPath, body, expect] = next(i);
      const r = await request(agent, port, method, urlPath, body);
      if (r.status !== 200 || !r.body.includes(expect)) {
        throw new Error(`${name}: ${method} ${urlPath} answered ${r.status}: ${r.body.slice(0, 200)}`);
      }
      done += 1;
    }
  };
  await Promise.all(Array.from({ length: conns }, loop));
  agent.destroy();
  console.error(`train.js: ${name}: ${done} requests`);
}

const small = (i) =>
  i % 2 ? ['POST', '/v1/chat/completions', Buffer.from(CHAT), 'chatcmpl-train'] : ['GET', '/v1/models', null, 'echo-1'];

async function h2c(port, ms) {
  const session = http2.connect(`http://127.0.0.1:${port}`);
  const deadline = Date.now() + ms;
  let done = 0;
  const one = () =>
    new Promise((resolve, reject) => {
      const s = session.request({ ':method': 'POST', ':path': '/v1/chat/completions', authorization: 'Bearer placeholder', 'content-type': 'application/json' });
      let status = 0;
      const chunks = [];
      s.on('response', (h) => (status = h[':status']));
      s.on('data', (c) => chunks.push(c));
      s.on('end', () => {
        const body = Buffer.concat(chunks).toString();
        if (status !== 200 || !body.includes('chatcmpl-train')) reject(new Error(`h2c: answered ${status}: ${body.slice(0, 200)}`));
        else resolve();
      });
      s.on('error', reject);
      s.end(CHAT);
    });
  await Promise.all(
    Array.from({ length: 8 }, async () => {
      while (Date.now() < deadline) {
        await one();
        done += 1;
      }
    }),
  );
  session.close();
  console.error(`train.js: h2c: ${done} requests`);
}

async function main() {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'behest-pgo-'));
  const children = [];
  const cleanup = () => {
    for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
    fs.rmSync(tmp, { recursive: true, force: true });
  };
  process.on('exit', cleanup);

  const up = http.createServer(upstream);
  up.keepAliveTimeout = 60000;
  const upPort = await listen(up);

  const idpPort = await freePort();
  const secret = require('crypto').randomBytes(24).toString('hex');
  const idp = spawn(process.execPath, [path.join(__dirname, '..', 'bench', 'idp.js'), '--port', String(idpPort), '--client-id', 'train', '--secret', secret, '--audience', 'https://api.behest.train'], { stdio: ['ignore', 'ignore', 'inherit'] });
  children.push(idp);
  await until('the IdP', () => fetch(`http://127.0.0.1:${idpPort}/stats`).then((r) => r.ok));

  const agentPort = await freePort();
  const env = {
    PATH: process.env.PATH,
    BEHEST_AGENT__AUTH__DOMAIN: `http://127.0.0.1:${idpPort}`,
    BEHEST_AGENT__AUTH__AUDIENCE: 'https://api.behest.train',
    BEHEST_AGENT__AUTH__CLIENT_ID: 'train',
    BEHEST_AGENT_CLIENT_SECRET: secret,
    BEHEST_AGENT__TOKEN__CACHE_FILE: '',
    BEHEST_AGENT__CONTROL__SOCKET: path.join(tmp, 'agent.sock'),
    BEHEST_AGENT__PROXY__LISTEN: `127.0.0.1:${agentPort}`,
    BEHEST_AGENT__PROXY__UPSTREAM: `http://127.0.0.1:${upPort}`,
    BEHEST_AGENT__PROXY__ALLOW_INSECURE_UPSTREAM: 'true',
    BEHEST_AGENT_CONFIG: path.join(tmp, 'none.toml'),
  };
  if (process.env.LLVM_PROFILE_FILE) env.LLVM_PROFILE_FILE = process.env.LLVM_PROFILE_FILE;
  fs.writeFileSync(env.BEHEST_AGENT_CONFIG, '', { mode: 0o600 });
  const agent = spawn(agentBin, ['--log-level', 'warn', 'run'], { env, stdio: ['ignore', 'inherit', 'inherit'] });
  children.push(agent);
  const exited = new Promise((resolve) => agent.on('exit', (code, signal) => resolve({ code, signal })));
  await until('the agent', () => request(undefined, agentPort, 'GET', '/v1/models').then((r) => r.status === 200));

  const ms = seconds * 1000;
  await load('small requests, 64 connections', agentPort, 64, { ms }, small);
  await load('small requests, 1 connection', agentPort, 1, { ms: ms / 8 }, small);
  await load('streamed completions, 16 connections', agentPort, 16, { ms: ms / 4 }, () => [
    'POST', '/v1/chat/completions', Buffer.from(CHAT_STREAM), 'data: [DONE]',
  ]);
  await load('1 MiB uploads, 4 connections', agentPort, 4, { count: 40 }, () => ['POST', '/v1/files', UPLOAD, 'file-train']);
  await h2c(agentPort, ms / 8);
  for (let i = 0; i < 30; i++) {
    const token = execFileSync(agentBin, ['token'], { env, encoding: 'utf8' });
    if (!token.startsWith('ey')) throw new Error('`behest-agent token` printed no token');
  }
  for (let i = 0; i < 5; i++) execFileSync(agentBin, ['status'], { env, stdio: 'ignore' });

  agent.kill('SIGTERM');
  const { code, signal } = await exited;
  if (code !== 0) throw new Error(`the agent exited with ${code ?? signal} after SIGTERM`);
  up.close();
  up.closeAllConnections();
  idp.kill('SIGTERM');
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error(`train.js: ${e.message}`);
    process.exit(1);
  },
);
