// A real OAuth2 authorization server (npm `oidc-provider`) for behest-agent's interop tests.
//
// Usage: node idp.mjs '<options json>'   (or the JSON in env IDP_OPTIONS)
//   {
//     "audience": "https://behest.test/api",   the only resource (API) it issues tokens for
//     "ttl": 300,                               access-token lifetime in seconds
//     "tid": "tenant-1", "pid": "project-1", "tier": "pro",
//     "clients": [{
//       "client_id": "...", "client_secret": "...",
//       "auth": "client_secret_post" | "client_secret_basic" | "private_key_jwt",
//       "jwks": { "keys": [...] },   public keys, for private_key_jwt
//       "alg": "PS256",              optional: pin token_endpoint_auth_signing_alg
//       "uid": "..." | null          optional: override the uid claim, null omits it
//     }]
//   }
// A claim (uid, tid, pid, tier) set on a client overrides the top-level value; null omits it.
// Absent: uid is the client id, tid/pid/tier take the defaults above.
//
// Prints one JSON line on stdout once listening: {"issuer","token_endpoint","jwks_uri"}.
// Exits when stdin closes (so it dies with the test that spawned it) or on SIGTERM/SIGINT.

import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { createServer } from 'node:http';

// oidc-provider prints notices with console.info, i.e. to stdout, which must carry only our one
// JSON line. Send all of it to stderr; patch before the (dynamic) import, which already warns.
console.log = console.info = console.debug = (...args) => console.error(...args);
// Start-up stages on stderr, which the tests print when the endpoints line does not come.
const stage = (what) => process.stderr.write(`idp.mjs: ${what} (${Math.round(performance.now())} ms)\n`);
const { default: Provider, errors } = await import('oidc-provider');
stage('oidc-provider loaded');

const raw = process.argv[2] ?? process.env.IDP_OPTIONS;
if (!raw) {
  console.error('usage: node idp.mjs \'<options json>\' (or set IDP_OPTIONS)');
  process.exit(2);
}
const options = JSON.parse(raw);
const audience = options.audience ?? 'https://behest.test/api';
const ttl = options.ttl ?? 300;
const defaults = {
  tid: options.tid === undefined ? 'tenant-1' : options.tid,
  pid: options.pid === undefined ? 'project-1' : options.pid,
  tier: options.tier === undefined ? 'pro' : options.tier,
};
const byId = new Map((options.clients ?? []).map((c) => [c.client_id, c]));
if (byId.size === 0) {
  console.error('idp.mjs: options.clients is empty');
  process.exit(2);
}

function clientMetadata(c) {
  const auth = c.auth ?? 'client_secret_post';
  const meta = {
    client_id: c.client_id,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: auth,
  };
  if (auth === 'private_key_jwt') {
    meta.jwks = c.jwks;
    if (c.alg) meta.token_endpoint_auth_signing_alg = c.alg;
  } else {
    meta.client_secret = c.client_secret;
  }
  return meta;
}

function tokenClaims(clientId) {
  const client = byId.get(clientId) ?? {};
  const claims = {};
  for (const [name, fallback] of Object.entries({ uid: clientId, ...defaults })) {
    const value = name in client ? client[name] : fallback;
    if (value !== null && value !== undefined) claims[name] = value;
  }
  return claims;
}

// A plain in-memory adapter: the same as oidc-provider's default, minus its start-up warning.
// Client credentials only store ReplayDetection (assertion jti) entries and opaque artifacts.
const store = new Map();
class MemoryAdapter {
  constructor(model) { this.model = model; }
  key(id) { return `${this.model}:${id}`; }
  async upsert(id, payload, expiresIn) {
    store.set(this.key(id), { payload, until: expiresIn ? Date.now() + expiresIn * 1000 : Infinity });
  }
  async find(id) {
    const entry = store.get(this.key(id));
    if (!entry || entry.until < Date.now()) return undefined;
    return entry.payload;
  }
  async findByUserCode() { return undefined; }
  async findByUid() { return undefined; }
  async consume(id) { const p = await this.find(id); if (p) p.consumed = Math.floor(Date.now() / 1000); }
  async destroy(id) { store.delete(this.key(id)); }
  async revokeByGrantId() {}
}

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
stage('signing key made');
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), alg: 'RS256', use: 'sig' };

const configuration = {
  adapter: MemoryAdapter,
  clients: [...byId.values()].map(clientMetadata),
  jwks: { keys: [signingKey] },
  enabledJWA: { clientAuthSigningAlgValues: ['RS256', 'PS256', 'ES256', 'RS384'] },
  ttl: { ClientCredentials: ttl },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => audience,
      useGrantedResource: () => true,
      getResourceServerInfo: (_ctx, resource) => {
        if (resource !== audience) throw new errors.InvalidTarget();
        return {
          scope: 'api:read',
          audience: resource,
          accessTokenFormat: 'jwt',
          accessTokenTTL: ttl,
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  extraTokenClaims: (_ctx, token) => tokenClaims(token.clientId),
};

const server = createServer();
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const { port } = server.address();
stage(`listening on ${port}`);
const provider = new Provider(`http://127.0.0.1:${port}`, configuration);
// Diagnostics for a failing test (the token endpoint's error bodies hide the reason).
provider.on('server_error', (_ctx, err) => console.error('idp.mjs server_error:', err));
provider.on('grant.error', (_ctx, err) => {
  console.error(`idp.mjs grant.error: ${err.error}: ${err.error_description}${err.error_detail ? ` (${err.error_detail})` : ''}`);
});
server.on('request', provider.callback());

const discovery = await (await fetch(`${provider.issuer}/.well-known/openid-configuration`)).json();
stage('discovery read');
process.stdout.write(`${JSON.stringify({
  issuer: discovery.issuer,
  token_endpoint: discovery.token_endpoint,
  jwks_uri: discovery.jwks_uri,
})}\n`);

const stop = () => {
  server.close();
  process.exit(0);
};
process.stdin.on('end', stop);
process.stdin.on('close', stop);
process.stdin.on('error', stop);
process.stdin.resume();
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
