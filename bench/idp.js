#!/usr/bin/env node
// A stub Auth0-compatible IdP for the benchmark (not a test fixture): one client, RS256 JWTs with
// the claims the agent checks (iss, aud, exp, uid) and Behest's (tid, pid, tier), a JWKS, and a
// grant counter. It can hold grant responses until released, so a benchmark can fire requests at
// an agent whose first grant is still in flight (the "1,000 requests, empty cache" figure).
//
//   node bench/idp.js --port P --client-id ID --secret S --audience A [--ttl SECONDS]
//
// Endpoints:
//   POST /oauth/token            client_credentials grant (client_secret_post or _basic)
//   GET  /.well-known/jwks.json  the public key
//   GET  /stats                  {"grants": N, "token_requests": N, "held": N, "hold": bool}
//   POST /admin/hold             hold every grant response from now on
//   POST /admin/release          answer the held ones and stop holding
//   POST /admin/issue            a fresh token for the client, without counting it (for nginx's config)
'use strict';
const http = require('http');
const crypto = require('crypto');

function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  if (i >= 0 && i + 1 < process.argv.length) return process.argv[i + 1];
  if (dflt === undefined) {
    console.error(`idp.js: --${name} is required`);
    process.exit(2);
  }
  return dflt;
}

const port = Number(arg('port'));
const clientId = arg('client-id');
const secret = arg('secret');
const audience = arg('audience');
const ttl = Number(arg('ttl', '86400'));
const issuer = `http://127.0.0.1:${port}/`;

const { publicKey, privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const kid = crypto.randomBytes(8).toString('hex');
const jwk = { ...publicKey.export({ format: 'jwk' }), kid, use: 'sig', alg: 'RS256' };
const jwks = JSON.stringify({ keys: [jwk] });

const b64url = (buf) => Buffer.from(buf).toString('base64url');

function sign() {
  const now = Math.floor(Date.now() / 1000);
  const header = { alg: 'RS256', typ: 'JWT', kid };
  const claims = {
    iss: issuer,
    sub: `${clientId}@clients`,
    aud: audience,
    iat: now,
    exp: now + ttl,
    azp: clientId,
    gty: 'client-credentials',
    uid: clientId,
    tid: 'bench-tenant',
    pid: 'bench-project',
    tier: 'bench',
  };
  const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
  const sig = crypto.sign('sha256', Buffer.from(input), privateKey);
  return `${input}.${b64url(sig)}`;
}

let grants = 0;
let tokenRequests = 0;
let hold = false;
let held = [];

function json(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

function answerGrant(res) {
  grants += 1;
  json(res, 200, { access_token: sign(), token_type: 'Bearer', expires_in: ttl });
}

function credentials(req, form) {
  let id = form.get('client_id');
  let sec = form.get('client_secret');
  const auth = req.headers.authorization || '';
  if (auth.startsWith('Basic ')) {
    const [u, p] = Buffer.from(auth.slice(6), 'base64').toString().split(':');
    id = decodeURIComponent(u || '');
    sec = decodeURIComponent(p || '');
  }
  return { id, sec };
}

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const url = new URL(req.url, issuer);
    const route = `${req.method} ${url.pathname}`;
    if (route === 'POST /oauth/token') {
      tokenRequests += 1;
      const form = new URLSearchParams(Buffer.concat(chunks).toString());
      const { id, sec } = credentials(req, form);
      if (form.get('grant_type') !== 'client_credentials') {
        return json(res, 400, { error: 'unsupported_grant_type' });
      }
      if (id !== clientId || sec !== secret) {
        return json(res, 401, { error: 'access_denied', error_description: 'Unauthorized' });
      }
      if (form.get('audience') && form.get('audience') !== audience) {
        return json(res, 403, { error: 'access_denied', error_description: 'Service not enabled within domain' });
      }
      if (hold) {
        held.push(res);
        return;
      }
      return answerGrant(res);
    }
    if (route === 'GET /.well-known/jwks.json') {
      res.writeHead(200, { 'content-type': 'application/json' });
      return res.end(jwks);
    }
    if (route === 'GET /stats') {
      return json(res, 200, { grants, token_requests: tokenRequests, held: held.length, hold });
    }
    if (route === 'POST /admin/hold') {
      hold = true;
      return json(res, 200, { hold });
    }
    if (route === 'POST /admin/release') {
      hold = false;
      const waiting = held;
      held = [];
      waiting.forEach(answerGrant);
      return json(res, 200, { released: waiting.length });
    }
    if (route === 'POST /admin/issue') {
      return json(res, 200, { access_token: sign() });
    }
    json(res, 404, { error: 'not_found' });
  });
});

server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`idp listening on ${issuer}\n`);
});
process.on('SIGTERM', () => process.exit(0));
