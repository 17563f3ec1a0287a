//! The embedded IdP: an in-process OAuth2 server that answers `POST /oauth/token` the way Auth0
//! does for the client-credentials grant, and serves the JWKS and discovery document the agent
//! verifies its tokens with. `behest-agent dev`, the integration tests and the benchmark use it.
//!
//! It owns one registered client (secret, and optionally a public key for `private_key_jwt`), one
//! API audience, and RSA signing keys that can be rotated. Tests steer it with [`Fault`]s — one-shot
//! ([`Idp::fail_next`]) or persistent ([`Idp::set_fault`]) — and read its counters and the last
//! token request it saw ([`Idp::last_grant`]). It is served as a hyper service ([`Idp::service`]);
//! the address it is built with is its issuer, which every token it signs names.
//!
//! It must never put a client secret, an assertion, an issued token or a private key into a log
//! line, an error or `Debug` output: the agent's own tests rely on the IdP not leaking for them.
//!
//! Layout: `keys` (signing keys, JWKS entries, client public keys) · `client_auth` (the three
//! client authentication methods and Auth0's assertion rules) · this file (options, faults,
//! routing, the grant and the token's claims).

mod client_auth;
mod keys;

pub use client_auth::AuthMethod;
pub use keys::{ClientKey, ClientKeyError};

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    CACHE_CONTROL, CONTENT_TYPE, HeaderName, HeaderValue, PRAGMA, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt as _, Full, Limited};
use jsonwebtoken::jwk::JwkSet;
use secrecy::SecretString;
use serde_json::{Map, Value, json};

use crate::{BoxError, Now};
use client_auth::{AssertionRules, Client, Credentials, JtiLedger};
use keys::SigningKey;

/// Token requests are a few hundred bytes; anything near this is a client bug.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Auth0's free-plan limit on `/oauth/token`, reported in `x-ratelimit-limit`.
const RATE_LIMIT_PER_SECOND: u64 = 30;
/// How long ago a token from [`Fault::Expired`] expired.
const EXPIRED_AGO_SECS: u64 = 600;
/// Form field names the [`GrantRecord`] breaks out; any other field lands in `extra`.
const KNOWN_FIELDS: [&str; 8] = [
    "grant_type",
    "client_id",
    "client_secret",
    "client_assertion",
    "audience",
    "resource",
    "scope",
    "organization",
];

/// Request parameters by name, from a form or a JSON object.
type Params = BTreeMap<String, String>;

/// What the IdP registers and how it issues tokens.
#[derive(Debug, Clone)]
pub struct IdpOptions {
    /// The one client allowed to ask for tokens.
    pub client_id: String,
    /// Its secret, for `client_secret_post` and `client_secret_basic`.
    pub client_secret: SecretString,
    /// Its public key, for `private_key_jwt`; without one, assertions are refused.
    pub client_public_key: Option<ClientKey>,
    /// The one API identifier tokens can be issued for (`audience` or `resource`).
    pub audience: String,
    /// Lifetime of issued tokens (`expires_in`, `exp - iat`).
    pub token_ttl: Duration,
    /// Behest claims the Auth0 Action would add; `None` leaves the claim out.
    pub tid: Option<String>,
    pub pid: Option<String>,
    pub tier: Option<String>,
    /// Source of `iat`/`exp` and of the time assertions are checked against.
    pub now: Now,
    /// More clients with a secret (id, secret), for an agent with several identities (profiles);
    /// each one's tokens carry its own id as `uid`.
    pub other_clients: Vec<(String, SecretString)>,
}

impl IdpOptions {
    /// A client with a secret, Auth0's 24 h default token lifetime, dev values for the Behest
    /// claims and the system clock.
    pub fn new(
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
        audience: impl Into<String>,
    ) -> Self {
        Self {
            client_id: client_id.into(),
            client_secret: SecretString::from(client_secret.into()),
            client_public_key: None,
            audience: audience.into(),
            token_ttl: Duration::from_secs(24 * 60 * 60),
            tid: Some("dev-tenant".to_owned()),
            pid: Some("dev-project".to_owned()),
            tier: Some("dev".to_owned()),
            now: Now::system(),
            other_clients: Vec::new(),
        }
    }
}

/// A misbehaviour to inject. Faults on `/oauth/token` are taken when a request arrives, before its
/// credentials are checked; [`Fault::JwksDown`] is taken by JWKS requests instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// This status with an HTML body, as a load balancer or proxy in front of the IdP answers.
    Status(u16),
    /// An OAuth2 error body, e.g. 401 `invalid_client` or 403 `access_denied`.
    Oauth {
        status: u16,
        error: String,
        description: String,
    },
    /// Auth0's 429 `too_many_requests` with `x-ratelimit-limit`/`-remaining`; `retry_after` adds a
    /// `Retry-After` of that many seconds, `reset_in` an `x-ratelimit-reset` that many seconds
    /// from now (a Unix time, as Auth0 sends it).
    TooManyRequests {
        retry_after: Option<u64>,
        reset_in: Option<u64>,
    },
    /// Auth0's 503 `temporarily_unavailable`, with a `Retry-After` of that many seconds if given.
    Unavailable { retry_after: Option<u64> },
    /// Waits this long, then answers normally.
    Delay(Duration),
    /// 200 with a JSON body cut short.
    Malformed,
    /// 200 with an empty body.
    Empty,
    /// 200 with an access token that is not a JWT.
    OpaqueToken,
    /// A token without the `uid` claim (what Auth0 does when the Action is missing).
    MissingUid,
    /// A token whose `uid` is this value instead of the client id.
    WrongUid(String),
    /// A token without `tid` and `pid`.
    MissingTidPid,
    /// A token naming the current `kid` but signed by a key the JWKS does not hold.
    BadSignature,
    /// A token signed by a key, and naming a `kid`, that the JWKS does not hold.
    UnknownKid,
    /// A token that expired ten minutes ago (`expires_in` still says the configured TTL).
    Expired,
    /// The JWKS endpoint answers 503.
    JwksDown,
    /// A token with this lifetime instead of the configured one.
    Ttl(Duration),
    /// A token whose claims are overridden by this object's members (`null` removes one).
    Claims(Value),
    /// A response whose `expires_in` is this value instead of the lifetime.
    ExpiresIn(Value),
    /// A response whose `token_type` is this instead of `Bearer`.
    TokenType(String),
}

/// The endpoint a fault is consumed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Token,
    Jwks,
}

impl Fault {
    fn endpoint(&self) -> Endpoint {
        match self {
            Fault::JwksDown => Endpoint::Jwks,
            _ => Endpoint::Token,
        }
    }
}

/// What the last request to `/oauth/token` asked for. Secrets are recorded only as sent or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRecord {
    pub auth_method: AuthMethod,
    /// From HTTP Basic or the form.
    pub client_id: Option<String>,
    pub grant_type: Option<String>,
    pub audience: Option<String>,
    pub resource: Option<String>,
    pub scope: Option<String>,
    pub organization: Option<String>,
    /// Every other parameter, by name (e.g. `client_assertion_type` or an `extra_params` entry).
    pub extra: BTreeMap<String, String>,
    /// A client secret arrived, in the form or in HTTP Basic.
    pub client_secret_sent: bool,
    pub client_assertion_sent: bool,
    /// The request's `Content-Type`.
    pub content_type: Option<String>,
}

/// A handle on a running (or not yet started) IdP; clones share state.
#[derive(Clone)]
pub struct Idp {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    /// [`IdpOptions::other_clients`].
    others: Vec<Client>,
    /// Grants per client id.
    grants_by_client: Mutex<std::collections::BTreeMap<String, u64>>,
    audience: String,
    token_ttl: Duration,
    tid: Option<String>,
    pid: Option<String>,
    tier: Option<String>,
    now: Now,
    /// `http://ADDRESS`: where it is reached, the issuer without its trailing slash.
    base_url: String,
    keys: RwLock<KeySet>,
    /// A key never published, for the bad-signature and unknown-kid faults; generated on first use.
    rogue_key: OnceLock<SigningKey>,
    faults: Mutex<Faults>,
    jtis: JtiLedger,
    last_grant: Mutex<Option<GrantRecord>>,
    /// 200 answers that carried an access token (including deliberately broken ones).
    grants: AtomicU64,
    /// Requests to `/oauth/token`, whatever their outcome.
    token_requests: AtomicU64,
    /// Requests to the JWKS, whatever their outcome.
    jwks_requests: AtomicU64,
}

/// The published keys: the one signing now, and the one before it while it is kept.
struct KeySet {
    current: Arc<SigningKey>,
    previous: Option<Arc<SigningKey>>,
}

#[derive(Default)]
struct Faults {
    /// One-shot faults in the order they will be taken.
    queued: VecDeque<Fault>,
    persistent: Option<Fault>,
}

impl Faults {
    /// The fault a request to `endpoint` meets: the first queued one for it, else the persistent
    /// one if it applies there.
    fn take(&mut self, endpoint: Endpoint) -> Option<Fault> {
        if let Some(index) = self.queued.iter().position(|f| f.endpoint() == endpoint) {
            return self.queued.remove(index);
        }
        self.persistent
            .clone()
            .filter(|fault| fault.endpoint() == endpoint)
    }
}

/// A grant that passed every check, about to be answered with a token.
struct Grant {
    /// The client it is for.
    client_id: String,
    audience: String,
    scope: Option<String>,
    organization: Option<String>,
}

impl Idp {
    /// An IdP with a freshly generated RS256 signing key, to be reached at `addr` (the address of
    /// the listener that will serve [`Idp::service`]): `http://{addr}/` is its issuer.
    pub fn new(addr: SocketAddr, opts: IdpOptions) -> Self {
        let key = Arc::new(SigningKey::generate());
        Self {
            inner: Arc::new(Inner {
                client: Client {
                    id: opts.client_id,
                    secret: Mutex::new(opts.client_secret),
                    public_key: opts.client_public_key,
                },
                others: opts
                    .other_clients
                    .into_iter()
                    .map(|(id, secret)| Client {
                        id,
                        secret: Mutex::new(secret),
                        public_key: None,
                    })
                    .collect(),
                grants_by_client: Mutex::default(),
                audience: opts.audience,
                token_ttl: opts.token_ttl,
                tid: opts.tid,
                pid: opts.pid,
                tier: opts.tier,
                now: opts.now,
                base_url: format!("http://{addr}"),
                keys: RwLock::new(KeySet {
                    current: key,
                    previous: None,
                }),
                rogue_key: OnceLock::new(),
                faults: Mutex::default(),
                jtis: JtiLedger::default(),
                last_grant: Mutex::default(),
                grants: AtomicU64::new(0),
                token_requests: AtomicU64::new(0),
                jwks_requests: AtomicU64::new(0),
            }),
        }
    }

    /// The IdP as a hyper service, to serve on the listener bound at its address (or to call
    /// directly with a request).
    pub fn service(&self) -> IdpService {
        IdpService(self.clone())
    }

    /// `http://ADDRESS`, without a trailing slash.
    pub fn base_url(&self) -> String {
        self.inner.base_url.clone()
    }

    /// The `iss` of issued tokens: [`Idp::base_url`] with Auth0's trailing slash.
    pub fn issuer(&self) -> String {
        format!("{}/", self.base_url())
    }

    pub fn token_endpoint(&self) -> String {
        format!("{}/oauth/token", self.base_url())
    }

    pub fn jwks_uri(&self) -> String {
        format!("{}/.well-known/jwks.json", self.base_url())
    }

    /// Tokens issued: 200 answers carrying an access token, including faulty ones.
    pub fn grants(&self) -> u64 {
        self.inner.grants.load(Ordering::SeqCst)
    }

    /// Grants made to `client_id`.
    pub fn grants_for(&self, client_id: &str) -> u64 {
        self.inner
            .grants_by_client
            .lock()
            .unwrap()
            .get(client_id)
            .copied()
            .unwrap_or(0)
    }

    /// Requests to `/oauth/token`, whatever their outcome.
    pub fn token_requests(&self) -> u64 {
        self.inner.token_requests.load(Ordering::SeqCst)
    }

    /// Requests to the JWKS, whatever their outcome.
    pub fn jwks_requests(&self) -> u64 {
        self.inner.jwks_requests.load(Ordering::SeqCst)
    }

    /// Rotates the client's secret: from now on only `secret` is accepted.
    pub fn set_client_secret(&self, secret: impl Into<String>) {
        *lock(&self.inner.client.secret) = SecretString::from(secret.into());
    }

    /// Queues `fault` for the next `n` requests to its endpoint, after faults already queued.
    pub fn fail_next(&self, n: u32, fault: Fault) {
        let mut faults = lock(&self.inner.faults);
        faults.queued.extend(std::iter::repeat_n(fault, n as usize));
    }

    /// Applies `fault` to every request to its endpoint that no queued fault takes, until it is
    /// replaced or cleared with `None`.
    pub fn set_fault(&self, fault: Option<Fault>) {
        lock(&self.inner.faults).persistent = fault;
    }

    /// Starts signing with a new key. The JWKS then lists it and, if `keep_previous`, the key it
    /// replaces (as Auth0 does until the old key is revoked). Generates an RSA key: call it from
    /// a test body, not a latency-sensitive path.
    pub fn rotate_key(&self, keep_previous: bool) {
        let next = Arc::new(SigningKey::generate());
        let mut keys = self
            .inner
            .keys
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let replaced = std::mem::replace(&mut keys.current, next);
        keys.previous = keep_previous.then_some(replaced);
    }

    /// The current signing key's `kid`.
    pub fn current_kid(&self) -> String {
        self.current_key().kid().to_owned()
    }

    /// Signs a token with the current key: the claims a grant would carry, with `claims` (an
    /// object) merged over them; a `null` value removes that claim. For tests that need a token
    /// that is expired, for another audience, and so on.
    pub fn mint(&self, claims: Value) -> String {
        let now = self.inner.now.unix();
        let mut merged = self.claims(
            &self.inner.client.id,
            &self.inner.audience,
            now,
            self.inner.token_ttl,
        );
        if let Value::Object(overrides) = claims {
            for (name, value) in overrides {
                if value.is_null() {
                    merged.remove(&name);
                } else {
                    merged.insert(name, value);
                }
            }
        }
        let key = self.current_key();
        key.sign(key.kid(), &Value::Object(merged))
    }

    /// The last request to `/oauth/token` that had a readable body, whatever its outcome.
    pub fn last_grant(&self) -> Option<GrantRecord> {
        lock(&self.inner.last_grant).clone()
    }

    async fn handle<B>(&self, request: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        match (request.method(), request.uri().path()) {
            (&Method::POST, "/oauth/token") => self.token(request).await,
            (&Method::GET, "/.well-known/jwks.json") => self.jwks_response(),
            (&Method::GET, "/.well-known/openid-configuration") => self.discovery(),
            _ => json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": "not_found", "error_description": "Not Found"}),
            ),
        }
    }

    async fn token<B>(&self, request: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        self.inner.token_requests.fetch_add(1, Ordering::SeqCst);
        // Taken on arrival, so a queued fault is used up whatever this request turns out to be.
        let fault = lock(&self.inner.faults).take(Endpoint::Token);

        let (parts, body) = request.into_parts();
        let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => {
                return OauthError::invalid_request("request body unreadable or over 64 KiB")
                    .into_response();
            }
        };
        let content_type = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok());
        let mut params = match parse_params(content_type, &body) {
            Ok(params) => params,
            Err(error) => return error.into_response(),
        };
        let credentials = Credentials::take(&parts.headers, &mut params);
        *lock(&self.inner.last_grant) = Some(record(&credentials, &params, content_type));

        match fault {
            Some(Fault::Delay(delay)) => tokio::time::sleep(delay).await,
            Some(ref fault) => {
                if let Some(response) = self.answer_instead(fault) {
                    return response;
                }
            }
            None => {}
        }

        match self.grant(&params, &credentials) {
            Ok(grant) => self.issue(&grant, fault.as_ref()),
            Err(error) => {
                tracing::debug!(
                    client_id = credentials.client_id(),
                    error = error.error,
                    "dev IdP refused a token request"
                );
                error.into_response()
            }
        }
    }

    /// The response a fault gives in place of the grant, for faults that replace it.
    fn answer_instead(&self, fault: &Fault) -> Option<Response<Full<Bytes>>> {
        let response = match fault {
            Fault::Status(code) => {
                let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::BAD_GATEWAY);
                html_response(status)
            }
            Fault::Oauth {
                status,
                error,
                description,
            } => oauth_error_response(
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST),
                error,
                description,
            ),
            Fault::TooManyRequests {
                retry_after,
                reset_in,
            } => {
                let mut response = oauth_error_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_requests",
                    "Global limit has been reached",
                );
                let headers = response.headers_mut();
                headers.insert(
                    HeaderName::from_static("x-ratelimit-limit"),
                    HeaderValue::from(RATE_LIMIT_PER_SECOND),
                );
                headers.insert(
                    HeaderName::from_static("x-ratelimit-remaining"),
                    HeaderValue::from(0u64),
                );
                if let Some(reset_in) = reset_in {
                    headers.insert(
                        HeaderName::from_static("x-ratelimit-reset"),
                        HeaderValue::from(self.inner.now.unix() + reset_in),
                    );
                }
                if let Some(retry_after) = retry_after {
                    headers.insert(RETRY_AFTER, HeaderValue::from(*retry_after));
                }
                response
            }
            Fault::Unavailable { retry_after } => {
                let mut response = oauth_error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    "The service is temporarily unavailable, try again later",
                );
                if let Some(retry_after) = retry_after {
                    response
                        .headers_mut()
                        .insert(RETRY_AFTER, HeaderValue::from(*retry_after));
                }
                response
            }
            Fault::Malformed => token_response(Bytes::from_static(b"{\"access_token\":\"eyJ")),
            Fault::Empty => token_response(Bytes::new()),
            _ => return None,
        };
        Some(response)
    }

    /// Checks a token request as Auth0 does: grant type, client authentication, audience.
    fn grant(&self, params: &Params, credentials: &Credentials) -> Result<Grant, OauthError> {
        match params.get("grant_type").map(String::as_str) {
            Some("client_credentials") => {}
            Some(other) => {
                return Err(OauthError::new(
                    StatusCode::BAD_REQUEST,
                    "unsupported_grant_type",
                    format!("Unsupported grant type: {other}"),
                ));
            }
            None => {
                return Err(OauthError::invalid_request(
                    "Missing required parameter: grant_type",
                ));
            }
        }

        let issuer = self.issuer();
        let token_endpoint = self.token_endpoint();
        let rules = AssertionRules {
            now: self.inner.now.unix(),
            audiences: [&issuer, &token_endpoint],
        };
        // One of the other clients when the request names one, else the main one.
        let client = credentials
            .client_id()
            .and_then(|id| self.inner.others.iter().find(|c| c.id == id))
            .unwrap_or(&self.inner.client);
        credentials.authenticate(client, &rules, &self.inner.jtis)?;

        // With Auth0's resource-parameter compatibility profile, `resource` names the API when
        // `audience` is absent; `audience` wins when both are sent.
        let audience = params
            .get("audience")
            .or_else(|| params.get("resource"))
            .ok_or_else(|| {
                OauthError::access_denied(
                    "No audience parameter was provided, and no default audience has been configured",
                )
            })?;
        if *audience != self.inner.audience {
            return Err(OauthError::access_denied(format!(
                "Service not found: {audience}"
            )));
        }
        Ok(Grant {
            client_id: client.id.clone(),
            audience: audience.clone(),
            scope: params.get("scope").cloned(),
            organization: params.get("organization").cloned(),
        })
    }

    /// Answers a granted request with a token, shaped by `fault` when it is one that shapes tokens.
    fn issue(&self, grant: &Grant, fault: Option<&Fault>) -> Response<Full<Bytes>> {
        let now = self.inner.now.unix();
        let ttl = match fault {
            Some(Fault::Ttl(ttl)) => *ttl,
            _ => self.inner.token_ttl,
        };
        let mut claims = self.claims(&grant.client_id, &grant.audience, now, ttl);
        if let Some(scope) = &grant.scope {
            claims.insert("scope".into(), json!(scope));
        }
        if let Some(organization) = &grant.organization {
            claims.insert("org_id".into(), json!(organization));
        }
        match fault {
            Some(Fault::MissingUid) => {
                claims.remove("uid");
            }
            Some(Fault::WrongUid(uid)) => {
                claims.insert("uid".into(), json!(uid));
            }
            Some(Fault::MissingTidPid) => {
                claims.remove("tid");
                claims.remove("pid");
            }
            Some(Fault::Expired) => {
                // Well past the minute of leeway verifiers commonly allow.
                let exp = now.saturating_sub(EXPIRED_AGO_SECS);
                claims.insert("exp".into(), json!(exp));
                claims.insert("iat".into(), json!(exp.saturating_sub(ttl.as_secs())));
            }
            Some(Fault::Claims(Value::Object(overrides))) => {
                for (name, value) in overrides {
                    match value {
                        Value::Null => claims.remove(name),
                        value => claims.insert(name.clone(), value.clone()),
                    };
                }
            }
            _ => {}
        }
        let claims = Value::Object(claims);

        let current = self.current_key();
        let access_token = match fault {
            Some(Fault::OpaqueToken) => keys::random_string(32),
            Some(Fault::BadSignature) => self.rogue_key().sign(current.kid(), &claims),
            Some(Fault::UnknownKid) => {
                let rogue = self.rogue_key();
                rogue.sign(rogue.kid(), &claims)
            }
            _ => current.sign(current.kid(), &claims),
        };

        let mut body = json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": ttl.as_secs(),
        });
        if let Some(scope) = &grant.scope {
            body["scope"] = json!(scope);
        }
        if let Some(Fault::ExpiresIn(value)) = fault {
            body["expires_in"] = value.clone();
        }
        if let Some(Fault::TokenType(kind)) = fault {
            body["token_type"] = json!(kind);
        }
        self.inner.grants.fetch_add(1, Ordering::SeqCst);
        *self
            .inner
            .grants_by_client
            .lock()
            .unwrap()
            .entry(grant.client_id.clone())
            .or_default() += 1;
        token_response(Bytes::from(body.to_string()))
    }

    /// The claims of an Auth0 machine-to-machine token for the registered client, plus the ones
    /// the Behest Action adds.
    fn claims(
        &self,
        client_id: &str,
        audience: &str,
        now: u64,
        ttl: Duration,
    ) -> Map<String, Value> {
        let inner = &self.inner;
        let mut claims = Map::new();
        claims.insert("iss".into(), json!(self.issuer()));
        claims.insert("sub".into(), json!(format!("{client_id}@clients")));
        claims.insert("aud".into(), json!(audience));
        claims.insert("iat".into(), json!(now));
        claims.insert("exp".into(), json!(now + ttl.as_secs()));
        claims.insert("azp".into(), json!(client_id));
        claims.insert("gty".into(), json!("client-credentials"));
        claims.insert("uid".into(), json!(client_id));
        for (name, value) in [
            ("tid", &inner.tid),
            ("pid", &inner.pid),
            ("tier", &inner.tier),
        ] {
            if let Some(value) = value {
                claims.insert(name.into(), json!(value));
            }
        }
        claims
    }

    /// The keys the JWKS endpoint publishes now: the current one, and the previous one while it is
    /// kept. Read in-process, this neither counts as a JWKS request nor meets a fault.
    pub fn jwk_set(&self) -> JwkSet {
        let keys = self
            .published()
            .into_iter()
            .map(|jwk| serde_json::from_value(jwk).expect("a JWKS entry the IdP built is a JWK"))
            .collect();
        JwkSet { keys }
    }

    /// The JWKS entries of the current key and of the previous one while it is kept.
    fn published(&self) -> Vec<Value> {
        let keys = self
            .inner
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        std::iter::once(&keys.current)
            .chain(keys.previous.as_ref())
            .map(|key| key.jwk().clone())
            .collect()
    }

    fn jwks_response(&self) -> Response<Full<Bytes>> {
        self.inner.jwks_requests.fetch_add(1, Ordering::SeqCst);
        if let Some(Fault::JwksDown) = lock(&self.inner.faults).take(Endpoint::Jwks) {
            return html_response(StatusCode::SERVICE_UNAVAILABLE);
        }
        let mut response = json_response(StatusCode::OK, &json!({ "keys": self.published() }));
        response.headers_mut().insert(
            CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=15"),
        );
        response
    }

    fn discovery(&self) -> Response<Full<Bytes>> {
        json_response(
            StatusCode::OK,
            &json!({
                "issuer": self.issuer(),
                "token_endpoint": self.token_endpoint(),
                "jwks_uri": self.jwks_uri(),
                "grant_types_supported": ["client_credentials"],
                "response_types_supported": ["token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "token_endpoint_auth_methods_supported":
                    ["client_secret_post", "client_secret_basic", "private_key_jwt"],
                "token_endpoint_auth_signing_alg_values_supported":
                    ["RS256", "RS384", "PS256", "ES256"],
            }),
        )
    }

    fn current_key(&self) -> Arc<SigningKey> {
        let keys = self
            .inner
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(&keys.current)
    }

    fn rogue_key(&self) -> &SigningKey {
        self.inner.rogue_key.get_or_init(SigningKey::generate)
    }
}

impl fmt::Debug for Idp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idp")
            .field("base_url", &self.inner.base_url)
            .field("client_id", &self.inner.client.id)
            .field("audience", &self.inner.audience)
            .field("grants", &self.grants())
            .field("token_requests", &self.token_requests())
            .field("jwks_requests", &self.jwks_requests())
            .finish_non_exhaustive()
    }
}

/// [`Idp::service`]: answers each request as the IdP.
#[derive(Clone, Debug)]
pub struct IdpService(Idp);

impl<B> hyper::service::Service<Request<B>> for IdpService
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<B>) -> Self::Future {
        let idp = self.0.clone();
        Box::pin(async move { Ok(idp.handle(request).await) })
    }
}

/// An OAuth2 error answer (RFC 6749 §5.2).
#[derive(Debug)]
struct OauthError {
    status: StatusCode,
    error: &'static str,
    description: String,
    /// Add `WWW-Authenticate: Basic`, as RFC 6749 asks after failed HTTP Basic authentication.
    basic_challenge: bool,
}

impl OauthError {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        Self {
            status,
            error,
            description: description.into(),
            basic_challenge: false,
        }
    }

    fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    fn invalid_client(description: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_client", description)
    }

    fn access_denied(description: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "access_denied", description)
    }

    fn with_basic_challenge(mut self) -> Self {
        self.basic_challenge = true;
        self
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = oauth_error_response(self.status, self.error, &self.description);
        if self.basic_challenge {
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"behest-agent dev IdP\""),
            );
        }
        response
    }
}

/// Reads the parameters of a token request: a form, or a JSON object of strings as Auth0 also
/// accepts. A repeated parameter is an error (RFC 6749 §3.2).
fn parse_params(content_type: Option<&str>, body: &[u8]) -> Result<Params, OauthError> {
    let media_type = content_type
        .and_then(|value| value.split(';').next())
        .map(|value| value.trim().to_ascii_lowercase());
    let mut params = Params::new();
    match media_type.as_deref() {
        Some("application/x-www-form-urlencoded") => {
            for (name, value) in url::form_urlencoded::parse(body) {
                if params
                    .insert(name.to_string(), value.into_owned())
                    .is_some()
                {
                    return Err(OauthError::invalid_request(format!(
                        "parameter {name} is repeated"
                    )));
                }
            }
        }
        Some("application/json") => {
            let object: Map<String, Value> = serde_json::from_slice(body)
                .map_err(|_| OauthError::invalid_request("body is not a JSON object"))?;
            for (name, value) in object {
                let Value::String(value) = value else {
                    return Err(OauthError::invalid_request(format!(
                        "parameter {name} must be a string"
                    )));
                };
                params.insert(name, value);
            }
        }
        _ => {
            return Err(OauthError::invalid_request(
                "Content-Type must be application/x-www-form-urlencoded (or application/json)",
            ));
        }
    }
    Ok(params)
}

fn record(credentials: &Credentials, params: &Params, content_type: Option<&str>) -> GrantRecord {
    let field = |name: &str| params.get(name).cloned();
    GrantRecord {
        auth_method: credentials.method(),
        client_id: credentials.client_id().map(str::to_owned),
        grant_type: field("grant_type"),
        audience: field("audience"),
        resource: field("resource"),
        scope: field("scope"),
        organization: field("organization"),
        extra: params
            .iter()
            .filter(|(name, _)| !KNOWN_FIELDS.contains(&name.as_str()))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect(),
        client_secret_sent: credentials.secret_sent(),
        client_assertion_sent: credentials.assertion_sent(),
        content_type: content_type.map(str::to_owned),
    }
}

/// A successful (or deliberately broken) token answer: JSON, never cached (RFC 6749 §5.1).
fn token_response(body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

fn oauth_error_response(
    status: StatusCode,
    error: &str,
    description: &str,
) -> Response<Full<Bytes>> {
    let mut response = json_response(
        status,
        &json!({ "error": error, "error_description": description }),
    );
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The kind of page a load balancer sends when the service behind it fails.
fn html_response(status: StatusCode) -> Response<Full<Bytes>> {
    let title = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    let page = format!(
        "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n</body>\r\n</html>\r\n"
    );
    let mut response = Response::new(Full::new(Bytes::from(page)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/html"));
    response
}

/// Locks a mutex whose data stays consistent even if a holder panicked (each critical section
/// here is a single assignment or lookup).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use http::HeaderMap;
    use http::header::AUTHORIZATION;
    use hyper::service::Service as _;
    use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
    use secrecy::ExposeSecret;

    use std::sync::atomic::AtomicU64;
    use std::time::SystemTime;

    const CLIENT_ID: &str = "dev-client";
    /// Holds characters HTTP Basic must form-urlencode (`:` `+` `%` `&`, non-ASCII).
    const SECRET: &str = "s3cr:t+/ü=%&x";
    const AUDIENCE: &str = "https://api.behest.test";

    fn options() -> IdpOptions {
        IdpOptions::new(CLIENT_ID, SECRET, AUDIENCE)
    }

    /// An IdP that believes it is reached at a loopback address; the tests call its service.
    fn new_idp(opts: IdpOptions) -> Idp {
        Idp::new(SocketAddr::from(([127, 0, 0, 1], 4000)), opts)
    }

    fn system_unix() -> u64 {
        Now::system().unix()
    }

    /// An answer read to the end.
    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    }

    impl Answer {
        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).expect("a JSON body")
        }

        fn header(&self, name: &str) -> Option<&str> {
            self.headers.get(name).and_then(|value| value.to_str().ok())
        }

        fn access_token(&self) -> String {
            assert_eq!(
                self.status,
                StatusCode::OK,
                "{}",
                String::from_utf8_lossy(&self.body)
            );
            self.json()["access_token"]
                .as_str()
                .expect("an access_token")
                .to_owned()
        }
    }

    async fn send(idp: &Idp, request: Request<Full<Bytes>>) -> Answer {
        let response = idp
            .service()
            .call(request)
            .await
            .unwrap_or_else(|never| match never {});
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .unwrap_or_else(|never| match never {})
            .to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    async fn get(idp: &Idp, path: &str) -> Answer {
        let request = Request::get(format!("{}{path}", idp.base_url()))
            .body(Full::default())
            .unwrap();
        send(idp, request).await
    }

    /// POSTs a form to the token endpoint, with `authorization` as the header if given.
    async fn post_form(
        idp: &Idp,
        fields: &[(&str, &str)],
        authorization: Option<String>,
    ) -> Answer {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        let mut request = Request::post(idp.token_endpoint())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(authorization) = authorization {
            request = request.header(AUTHORIZATION, authorization);
        }
        send(idp, request.body(Full::new(Bytes::from(body))).unwrap()).await
    }

    async fn post_secret(idp: &Idp, extra: &[(&str, &str)]) -> Answer {
        let mut fields = vec![
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", SECRET),
            ("audience", AUDIENCE),
        ];
        fields.extend_from_slice(extra);
        post_form(idp, &fields, None).await
    }

    /// `Basic base64(urlencode(id) ":" urlencode(secret))`, as RFC 6749 §2.3.1 has it.
    fn basic(id: &str, secret: &str) -> String {
        let encode = |value: &str| {
            url::form_urlencoded::byte_serialize(value.as_bytes()).collect::<String>()
        };
        format!(
            "Basic {}",
            STANDARD.encode(format!("{}:{}", encode(id), encode(secret)))
        )
    }

    /// Checks `token` against the JWKS the IdP serves, as the agent would, and returns its claims.
    async fn verify(idp: &Idp, token: &str) -> Result<Map<String, Value>, String> {
        let jwks: JwkSet = serde_json::from_slice(&get(idp, "/.well-known/jwks.json").await.body)
            .map_err(|e| e.to_string())?;
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
        let kid = header.kid.ok_or("no kid")?;
        let jwk = jwks
            .find(&kid)
            .ok_or_else(|| format!("kid {kid} is not in the JWKS"))?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_issuer(&[idp.issuer()]);
        let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
        jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
            .map(|data| data.claims)
            .map_err(|e| e.to_string())
    }

    fn unverified_claims(token: &str) -> Map<String, Value> {
        jsonwebtoken::dangerous::insecure_decode_claims(token).expect("a JWT")
    }

    /// An IdP whose client also has an RSA key for `private_key_jwt`, and that key's private half.
    fn with_client_key() -> (Idp, EncodingKey) {
        let (private_pem, public_key) = ClientKey::generate_rsa();
        let signer = EncodingKey::from_rsa_pem(private_pem.expose_secret().as_bytes()).unwrap();
        let mut opts = options();
        opts.client_public_key = Some(public_key);
        (new_idp(opts), signer)
    }

    /// A client assertion as Auth0 wants it, with `overrides` merged over the claims.
    fn assertion(idp: &Idp, signer: &EncodingKey, alg: Algorithm, overrides: Value) -> String {
        let now = system_unix();
        let mut claims = json!({
            "iss": CLIENT_ID,
            "sub": CLIENT_ID,
            "aud": idp.issuer(),
            "iat": now,
            "exp": now + 60,
            "jti": keys::random_string(16),
        });
        if let (Value::Object(claims), Value::Object(overrides)) = (&mut claims, overrides) {
            claims.extend(overrides);
        }
        jsonwebtoken::encode(&Header::new(alg), &claims, signer).unwrap()
    }

    async fn post_assertion(idp: &Idp, assertion: &str) -> Answer {
        let fields = [
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_assertion_type", client_auth::ASSERTION_TYPE),
            ("client_assertion", assertion),
            ("audience", AUDIENCE),
        ];
        post_form(idp, &fields, None).await
    }

    fn assert_oauth_error(answer: &Answer, status: StatusCode, error: &str) {
        assert_eq!(
            answer.status,
            status,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(answer.json()["error"], error);
        assert!(
            answer.json()["error_description"]
                .as_str()
                .is_some_and(|d| !d.is_empty())
        );
    }

    #[tokio::test]
    async fn other_clients_get_tokens_for_themselves_with_their_own_secret() {
        let mut opts = options();
        opts.other_clients = vec![("team-b".into(), SecretString::from("b-secret"))];
        let idp = new_idp(opts);
        let fields = [
            ("grant_type", "client_credentials"),
            ("client_id", "team-b"),
            ("client_secret", "b-secret"),
            ("audience", AUDIENCE),
        ];
        let token = post_form(&idp, &fields, None).await.access_token();
        let claims = verify(&idp, &token).await.unwrap();
        assert_eq!(
            (claims["uid"].as_str(), claims["azp"].as_str()),
            (Some("team-b"), Some("team-b"))
        );
        assert_eq!(
            (idp.grants_for("team-b"), idp.grants_for(CLIENT_ID)),
            (1, 0)
        );
        // Another client's secret is not this one's.
        let fields = [
            ("grant_type", "client_credentials"),
            ("client_id", "team-b"),
            ("client_secret", SECRET),
            ("audience", AUDIENCE),
        ];
        assert_oauth_error(
            &post_form(&idp, &fields, None).await,
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        );
        post_secret(&idp, &[]).await.access_token();
        assert_eq!(idp.grants_for(CLIENT_ID), 1);
    }

    #[tokio::test]
    async fn client_secret_post_grant_returns_an_auth0_shaped_jwt_that_verifies_against_the_jwks() {
        let idp = new_idp(options());

        let answer = post_secret(&idp, &[]).await;

        let token = answer.access_token();
        assert_eq!(answer.header("cache-control"), Some("no-store"));
        let body = answer.json();
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 86400);
        assert!(body.get("scope").is_none());

        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::RS256);
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        assert_eq!(header.kid, Some(idp.current_kid()));

        let claims = verify(&idp, &token).await.unwrap();
        assert!(idp.issuer().ends_with('/'));
        assert_eq!(claims["iss"], json!(idp.issuer()));
        assert_eq!(claims["sub"], json!(format!("{CLIENT_ID}@clients")));
        assert_eq!(
            claims["aud"],
            json!(AUDIENCE),
            "aud is a string, as Auth0 sends it"
        );
        assert_eq!(claims["azp"], json!(CLIENT_ID));
        assert_eq!(claims["gty"], json!("client-credentials"));
        assert_eq!(claims["uid"], json!(CLIENT_ID));
        assert_eq!(claims["tid"], json!("dev-tenant"));
        assert_eq!(claims["pid"], json!("dev-project"));
        assert_eq!(claims["tier"], json!("dev"));
        let iat = claims["iat"].as_u64().unwrap();
        assert_eq!(claims["exp"].as_u64().unwrap() - iat, 86400);
        let mut names: Vec<&str> = claims.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "aud", "azp", "exp", "gty", "iat", "iss", "pid", "sub", "tid", "tier", "uid"
            ]
        );

        let record = idp.last_grant().unwrap();
        assert_eq!(record.auth_method, AuthMethod::ClientSecretPost);
        assert!(record.client_secret_sent);
        assert_eq!(idp.grants(), 1);
    }

    #[tokio::test]
    async fn client_secret_basic_decodes_form_urlencoded_id_and_secret() {
        let idp = new_idp(options());
        let fields = [("grant_type", "client_credentials"), ("audience", AUDIENCE)];

        let answer = post_form(&idp, &fields, Some(basic(CLIENT_ID, SECRET))).await;

        let claims = verify(&idp, &answer.access_token()).await.unwrap();
        assert_eq!(claims["uid"], json!(CLIENT_ID));
        let record = idp.last_grant().unwrap();
        assert_eq!(record.auth_method, AuthMethod::ClientSecretBasic);
        assert_eq!(record.client_id.as_deref(), Some(CLIENT_ID));

        // Without the form-urlencoding, `+` reads as a space and the secret no longer matches.
        let raw = format!("Basic {}", STANDARD.encode(format!("{CLIENT_ID}:{SECRET}")));
        let answer = post_form(&idp, &fields, Some(raw)).await;
        assert_oauth_error(&answer, StatusCode::UNAUTHORIZED, "invalid_client");
        assert!(
            answer
                .header("www-authenticate")
                .is_some_and(|v| v.starts_with("Basic"))
        );
    }

    #[tokio::test]
    async fn private_key_jwt_grant_accepts_a_fresh_assertion_and_refuses_its_replay() {
        let (idp, signer) = with_client_key();
        let assertion = assertion(&idp, &signer, Algorithm::RS256, json!({}));

        let answer = post_assertion(&idp, &assertion).await;

        let claims = verify(&idp, &answer.access_token()).await.unwrap();
        assert_eq!(claims["sub"], json!(format!("{CLIENT_ID}@clients")));
        let record = idp.last_grant().unwrap();
        assert_eq!(record.auth_method, AuthMethod::PrivateKeyJwt);
        assert!(record.client_assertion_sent);
        assert!(!record.client_secret_sent);
        assert_eq!(
            record
                .extra
                .get("client_assertion_type")
                .map(String::as_str),
            Some(client_auth::ASSERTION_TYPE)
        );

        let replay = post_assertion(&idp, &assertion).await;
        assert_oauth_error(&replay, StatusCode::UNAUTHORIZED, "invalid_client");
        assert!(
            replay.json()["error_description"]
                .as_str()
                .unwrap()
                .contains("jti")
        );
        assert_eq!(idp.grants(), 1);
    }

    #[tokio::test]
    async fn private_key_jwt_enforces_auth0_assertion_rules() {
        let (idp, signer) = with_client_key();
        let now = system_unix();
        let token_endpoint = idp.token_endpoint();
        let accepted = [
            (Algorithm::RS256, json!({ "aud": token_endpoint })),
            (Algorithm::RS384, json!({ "aud": [AUDIENCE, idp.issuer()] })),
            (Algorithm::PS256, json!({ "exp": now + 300 })),
        ];
        for (alg, overrides) in accepted {
            let answer =
                post_assertion(&idp, &assertion(&idp, &signer, alg, overrides.clone())).await;
            assert_eq!(
                answer.status,
                StatusCode::OK,
                "{alg:?} {overrides}: {}",
                answer.json()
            );
        }

        let refused = [
            (Algorithm::RS256, json!({ "aud": idp.base_url() })), // no trailing slash
            (Algorithm::RS512, json!({})),                        // not an Auth0 assertion alg
            (Algorithm::RS256, json!({ "exp": now + 600 })),      // more than 5 minutes ahead
            (Algorithm::RS256, json!({ "exp": now - 60 })),       // expired beyond the skew
            (Algorithm::RS256, json!({ "exp": null })),
            (Algorithm::RS256, json!({ "jti": null })),
            (Algorithm::RS256, json!({ "iss": "someone-else" })),
            (Algorithm::RS256, json!({ "sub": "someone-else" })),
        ];
        for (alg, overrides) in refused {
            let answer =
                post_assertion(&idp, &assertion(&idp, &signer, alg, overrides.clone())).await;
            assert_eq!(
                answer.status,
                StatusCode::UNAUTHORIZED,
                "{alg:?} {overrides} was accepted"
            );
            assert_eq!(answer.json()["error"], "invalid_client");
        }

        // Signed by a key that is not the registered one.
        let (other_pem, _) = ClientKey::generate_rsa();
        let other = EncodingKey::from_rsa_pem(other_pem.expose_secret().as_bytes()).unwrap();
        let answer =
            post_assertion(&idp, &assertion(&idp, &other, Algorithm::RS256, json!({}))).await;
        assert_oauth_error(&answer, StatusCode::UNAUTHORIZED, "invalid_client");
        assert_eq!(idp.grants(), 3);
    }

    #[tokio::test]
    async fn private_key_jwt_is_refused_for_a_client_without_a_registered_key() {
        let idp = new_idp(options());
        let (private_pem, _) = ClientKey::generate_rsa();
        let signer = EncodingKey::from_rsa_pem(private_pem.expose_secret().as_bytes()).unwrap();

        let answer =
            post_assertion(&idp, &assertion(&idp, &signer, Algorithm::RS256, json!({}))).await;

        assert_oauth_error(&answer, StatusCode::UNAUTHORIZED, "invalid_client");
    }

    #[tokio::test]
    async fn es256_assertion_verifies_against_a_p256_client_key() {
        let random = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &random).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let public_pem =
            keys::pem_encode("PUBLIC KEY", pair.public_key().as_der().unwrap().as_ref());
        let mut opts = options();
        opts.client_public_key = Some(ClientKey::from_pem(&public_pem).unwrap());
        let idp = new_idp(opts);
        // jsonwebtoken's aws-lc backend takes EC private keys as PKCS#8 DER.
        let signer = EncodingKey::from_ec_der(pkcs8.as_ref());

        let answer =
            post_assertion(&idp, &assertion(&idp, &signer, Algorithm::ES256, json!({}))).await;

        verify(&idp, &answer.access_token()).await.unwrap();
    }

    #[tokio::test]
    async fn assertion_times_and_token_times_follow_the_injected_clock() {
        let (private_pem, public_key) = ClientKey::generate_rsa();
        let signer = EncodingKey::from_rsa_pem(private_pem.expose_secret().as_bytes()).unwrap();
        let ahead = Arc::new(AtomicU64::new(0));
        let mut opts = options();
        opts.client_public_key = Some(public_key);
        opts.now = Now::from_fn({
            let ahead = ahead.clone();
            move || SystemTime::now() + Duration::from_secs(ahead.load(Ordering::SeqCst))
        });
        let idp_clock = opts.now.clone();
        let idp = new_idp(opts);
        ahead.store(3600, Ordering::SeqCst);

        // Fresh by the wall clock, an hour old by the IdP's.
        let stale = assertion(&idp, &signer, Algorithm::RS256, json!({}));
        assert_oauth_error(
            &post_assertion(&idp, &stale).await,
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        );

        let idp_now = idp_clock.unix();
        let fresh = assertion(
            &idp,
            &signer,
            Algorithm::RS256,
            json!({ "iat": idp_now, "exp": idp_now + 60 }),
        );
        let token = post_assertion(&idp, &fresh).await.access_token();
        let iat = unverified_claims(&token)["iat"].as_u64().unwrap();
        assert!(
            (idp_now..idp_now + 5).contains(&iat),
            "iat {iat} is not the IdP clock's {idp_now}"
        );
    }

    #[tokio::test]
    async fn wrong_or_missing_credentials_are_401_invalid_client() {
        let idp = new_idp(options());
        let grant = ("grant_type", "client_credentials");
        let audience = ("audience", AUDIENCE);

        let wrong_secret = [
            grant,
            ("client_id", CLIENT_ID),
            ("client_secret", "nope"),
            audience,
        ];
        let unknown_client = [
            grant,
            ("client_id", "nobody"),
            ("client_secret", SECRET),
            audience,
        ];
        let no_secret = [grant, ("client_id", CLIENT_ID), audience];
        for fields in [&wrong_secret[..], &unknown_client[..], &no_secret[..]] {
            let answer = post_form(&idp, fields, None).await;
            assert_oauth_error(&answer, StatusCode::UNAUTHORIZED, "invalid_client");
            assert!(!String::from_utf8_lossy(&answer.body).contains(SECRET));
        }

        let answer = post_form(&idp, &[grant, audience], Some(basic(CLIENT_ID, "nope"))).await;
        assert_oauth_error(&answer, StatusCode::UNAUTHORIZED, "invalid_client");
        assert!(answer.header("www-authenticate").is_some());
        assert_eq!(idp.grants(), 0);
    }

    #[tokio::test]
    async fn two_authentication_methods_in_one_request_are_refused() {
        let idp = new_idp(options());

        let answer = post_form(
            &idp,
            &[
                ("grant_type", "client_credentials"),
                ("client_secret", SECRET),
                ("audience", AUDIENCE),
            ],
            Some(basic(CLIENT_ID, SECRET)),
        )
        .await;

        assert_oauth_error(&answer, StatusCode::BAD_REQUEST, "invalid_request");
    }

    #[tokio::test]
    async fn missing_or_unknown_audience_is_403_access_denied() {
        let idp = new_idp(options());

        let missing = post_form(
            &idp,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT_ID),
                ("client_secret", SECRET),
            ],
            None,
        )
        .await;
        assert_oauth_error(&missing, StatusCode::FORBIDDEN, "access_denied");
        assert!(
            missing.json()["error_description"]
                .as_str()
                .unwrap()
                .contains("No audience")
        );

        let unknown = post_form(
            &idp,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT_ID),
                ("client_secret", SECRET),
                ("audience", "https://elsewhere.test"),
            ],
            None,
        )
        .await;
        assert_oauth_error(&unknown, StatusCode::FORBIDDEN, "access_denied");
        assert_eq!(idp.grants(), 0);
    }

    #[tokio::test]
    async fn resource_names_the_audience_when_audience_is_absent() {
        let idp = new_idp(options());

        let answer = post_form(
            &idp,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT_ID),
                ("client_secret", SECRET),
                ("resource", AUDIENCE),
            ],
            None,
        )
        .await;

        let claims = verify(&idp, &answer.access_token()).await.unwrap();
        assert_eq!(claims["aud"], json!(AUDIENCE));
        assert_eq!(
            idp.last_grant().unwrap().resource.as_deref(),
            Some(AUDIENCE)
        );
    }

    #[tokio::test]
    async fn grant_types_other_than_client_credentials_are_400_unsupported_grant_type() {
        let idp = new_idp(options());

        let answer = post_form(
            &idp,
            &[
                ("grant_type", "password"),
                ("client_id", CLIENT_ID),
                ("client_secret", SECRET),
                ("audience", AUDIENCE),
            ],
            None,
        )
        .await;

        assert_oauth_error(&answer, StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }

    #[tokio::test]
    async fn scope_and_organization_are_echoed_and_recorded_without_the_secret() {
        let idp = new_idp(options());

        let answer = post_secret(
            &idp,
            &[
                ("scope", "read:models write:chat"),
                ("organization", "org_123"),
                ("team", "ci"),
            ],
        )
        .await;

        let token = answer.access_token();
        assert_eq!(answer.json()["scope"], "read:models write:chat");
        let claims = verify(&idp, &token).await.unwrap();
        assert_eq!(claims["scope"], json!("read:models write:chat"));
        assert_eq!(claims["org_id"], json!("org_123"));

        let record = idp.last_grant().unwrap();
        assert_eq!(record.scope.as_deref(), Some("read:models write:chat"));
        assert_eq!(record.organization.as_deref(), Some("org_123"));
        assert_eq!(record.audience.as_deref(), Some(AUDIENCE));
        assert_eq!(
            record.extra,
            BTreeMap::from([("team".to_owned(), "ci".to_owned())])
        );
        assert_eq!(
            record.content_type.as_deref(),
            Some("application/x-www-form-urlencoded")
        );
        for printed in [
            format!("{record:?}"),
            format!("{idp:?}"),
            format!("{:?}", options()),
        ] {
            assert!(
                !printed.contains(SECRET),
                "a secret in Debug output: {printed}"
            );
            assert!(!printed.contains(&token), "a token in Debug output");
        }
    }

    #[tokio::test]
    async fn json_bodies_are_accepted_like_auth0_but_repeated_form_fields_are_not() {
        let idp = new_idp(options());
        let body = json!({
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": SECRET,
            "audience": AUDIENCE,
        });
        let request = Request::post(idp.token_endpoint())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();

        let answer = send(&idp, request).await;
        verify(&idp, &answer.access_token()).await.unwrap();

        let repeated = post_secret(&idp, &[("audience", AUDIENCE)]).await;
        assert_oauth_error(&repeated, StatusCode::BAD_REQUEST, "invalid_request");
    }

    #[tokio::test]
    async fn too_many_requests_fault_carries_retry_after_and_ratelimit_reset_once() {
        let idp = new_idp(options());
        idp.fail_next(
            1,
            Fault::TooManyRequests {
                retry_after: Some(7),
                reset_in: Some(30),
            },
        );

        let before = system_unix();
        let limited = post_secret(&idp, &[]).await;
        let after = system_unix();

        assert_oauth_error(&limited, StatusCode::TOO_MANY_REQUESTS, "too_many_requests");
        assert_eq!(limited.header("retry-after"), Some("7"));
        assert_eq!(limited.header("x-ratelimit-remaining"), Some("0"));
        let reset: u64 = limited
            .header("x-ratelimit-reset")
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (before + 30..=after + 30).contains(&reset),
            "x-ratelimit-reset is a Unix time"
        );

        post_secret(&idp, &[]).await.access_token();
        assert_eq!((idp.token_requests(), idp.grants()), (2, 1));
    }

    #[tokio::test]
    async fn unavailable_fault_is_503_temporarily_unavailable_with_retry_after() {
        let idp = new_idp(options());
        idp.fail_next(
            1,
            Fault::Unavailable {
                retry_after: Some(3),
            },
        );

        let answer = post_secret(&idp, &[]).await;

        assert_oauth_error(
            &answer,
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
        );
        assert_eq!(answer.header("retry-after"), Some("3"));
    }

    #[tokio::test]
    async fn one_shot_faults_are_taken_in_order_and_the_persistent_one_after_them() {
        let idp = new_idp(options());
        idp.set_fault(Some(Fault::Status(503)));
        idp.fail_next(1, Fault::Status(502));
        idp.fail_next(
            1,
            Fault::Oauth {
                status: 403,
                error: "unauthorized_client".into(),
                description: "Grant type 'client_credentials' not allowed for the client.".into(),
            },
        );

        let first = post_secret(&idp, &[]).await;
        assert_eq!(first.status, StatusCode::BAD_GATEWAY);
        assert_eq!(first.header("content-type"), Some("text/html"));
        assert!(String::from_utf8_lossy(&first.body).contains("502 Bad Gateway"));
        assert_oauth_error(
            &post_secret(&idp, &[]).await,
            StatusCode::FORBIDDEN,
            "unauthorized_client",
        );
        assert_eq!(
            post_secret(&idp, &[]).await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            post_secret(&idp, &[]).await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );

        idp.set_fault(None);
        post_secret(&idp, &[]).await.access_token();
    }

    #[tokio::test]
    async fn malformed_empty_and_opaque_answers_look_like_a_broken_server() {
        let idp = new_idp(options());
        idp.fail_next(1, Fault::Malformed);
        idp.fail_next(1, Fault::Empty);
        idp.fail_next(1, Fault::OpaqueToken);

        let malformed = post_secret(&idp, &[]).await;
        assert_eq!(malformed.status, StatusCode::OK);
        assert!(serde_json::from_slice::<Value>(&malformed.body).is_err());

        let empty = post_secret(&idp, &[]).await;
        assert_eq!(empty.status, StatusCode::OK);
        assert!(empty.body.is_empty());

        let opaque = post_secret(&idp, &[]).await.access_token();
        assert!(
            jsonwebtoken::decode_header(&opaque).is_err(),
            "opaque token parsed as a JWT"
        );
        assert_eq!(idp.grants(), 1, "only the opaque answer carried a token");
    }

    #[tokio::test]
    async fn token_faults_change_exactly_the_claims_they_name() {
        let idp = new_idp(options());
        idp.fail_next(1, Fault::MissingUid);
        idp.fail_next(1, Fault::WrongUid("someone-else".into()));
        idp.fail_next(1, Fault::MissingTidPid);
        idp.fail_next(1, Fault::Expired);
        idp.fail_next(1, Fault::Ttl(Duration::from_secs(90)));

        let missing_uid = verify(&idp, &post_secret(&idp, &[]).await.access_token())
            .await
            .unwrap();
        assert!(missing_uid.get("uid").is_none());
        assert_eq!(missing_uid["tid"], json!("dev-tenant"));

        let wrong_uid = verify(&idp, &post_secret(&idp, &[]).await.access_token())
            .await
            .unwrap();
        assert_eq!(wrong_uid["uid"], json!("someone-else"));

        let no_tid_pid = verify(&idp, &post_secret(&idp, &[]).await.access_token())
            .await
            .unwrap();
        assert!(no_tid_pid.get("tid").is_none() && no_tid_pid.get("pid").is_none());
        assert_eq!(no_tid_pid["uid"], json!(CLIENT_ID));

        let expired = post_secret(&idp, &[]).await.access_token();
        let error = verify(&idp, &expired).await.unwrap_err();
        assert!(error.contains("ExpiredSignature"), "{error}");
        let claims = unverified_claims(&expired);
        assert!(claims["exp"].as_u64().unwrap() < system_unix());

        let short = post_secret(&idp, &[]).await;
        assert_eq!(short.json()["expires_in"], 90);
        let claims = verify(&idp, &short.access_token()).await.unwrap();
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            90
        );
    }

    #[tokio::test]
    async fn bad_signature_and_unknown_kid_tokens_fail_against_the_jwks() {
        let idp = new_idp(options());
        idp.fail_next(1, Fault::BadSignature);
        idp.fail_next(1, Fault::UnknownKid);

        let forged = post_secret(&idp, &[]).await.access_token();
        assert_eq!(
            jsonwebtoken::decode_header(&forged).unwrap().kid,
            Some(idp.current_kid())
        );
        let error = verify(&idp, &forged).await.unwrap_err();
        assert!(error.contains("InvalidSignature"), "{error}");

        let unknown = post_secret(&idp, &[]).await.access_token();
        let error = verify(&idp, &unknown).await.unwrap_err();
        assert!(error.contains("not in the JWKS"), "{error}");
    }

    #[tokio::test]
    async fn jwks_down_answers_503_without_touching_the_token_endpoint() {
        let idp = new_idp(options());
        idp.fail_next(1, Fault::JwksDown);

        post_secret(&idp, &[]).await.access_token();
        assert_eq!(
            get(&idp, "/.well-known/jwks.json").await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        let jwks = get(&idp, "/.well-known/jwks.json").await;
        assert_eq!(jwks.status, StatusCode::OK);
        assert_eq!(jwks.json()["keys"][0]["kid"], json!(idp.current_kid()));
        assert_eq!(idp.jwks_requests(), 2);
    }

    #[tokio::test]
    async fn delay_fault_answers_normally_after_waiting() {
        let idp = new_idp(options());
        let delay = Duration::from_millis(200);
        idp.fail_next(1, Fault::Delay(delay));

        // A lower bound only: it proves the wait happened without timing anything.
        let started = tokio::time::Instant::now();
        post_secret(&idp, &[]).await.access_token();

        assert!(started.elapsed() >= delay);
    }

    #[tokio::test]
    async fn rotation_keeps_the_previous_kid_only_when_asked() {
        let idp = new_idp(options());
        let first_kid = idp.current_kid();
        let old_token = post_secret(&idp, &[]).await.access_token();

        idp.rotate_key(true);
        let second_kid = idp.current_kid();
        assert_ne!(first_kid, second_kid);
        let kids = |answer: Answer| -> Vec<String> {
            let jwks = answer.json();
            jwks["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|key| key["kid"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(
            kids(get(&idp, "/.well-known/jwks.json").await),
            [second_kid.clone(), first_kid]
        );
        verify(&idp, &old_token)
            .await
            .expect("the kept previous key still verifies");
        let new_token = post_secret(&idp, &[]).await.access_token();
        assert_eq!(
            jsonwebtoken::decode_header(&new_token).unwrap().kid,
            Some(second_kid.clone())
        );
        verify(&idp, &new_token).await.unwrap();

        idp.rotate_key(false);
        let third_kid = idp.current_kid();
        assert_eq!(kids(get(&idp, "/.well-known/jwks.json").await), [third_kid]);
        assert!(
            verify(&idp, &new_token).await.is_err(),
            "a dropped key no longer verifies"
        );
    }

    #[tokio::test]
    async fn mint_signs_default_claims_with_overrides_and_null_removes_a_claim() {
        let idp = new_idp(options());

        let token = idp.mint(json!({ "tier": "pro", "pid": null, "custom": 1 }));

        let claims = verify(&idp, &token).await.unwrap();
        assert_eq!(claims["tier"], json!("pro"));
        assert!(claims.get("pid").is_none());
        assert_eq!(claims["custom"], json!(1));
        assert_eq!(claims["uid"], json!(CLIENT_ID));
        assert_eq!(idp.grants(), 0, "minting is not a grant");
    }

    #[tokio::test]
    async fn discovery_names_the_endpoints_and_client_auth_methods() {
        let idp = new_idp(options());

        let discovery = get(&idp, "/.well-known/openid-configuration").await.json();

        assert_eq!(discovery["issuer"], json!(idp.issuer()));
        assert_eq!(
            discovery["token_endpoint"],
            json!(format!("{}/oauth/token", idp.base_url()))
        );
        assert_eq!(
            discovery["jwks_uri"],
            json!(format!("{}/.well-known/jwks.json", idp.base_url()))
        );
        assert_eq!(
            discovery["token_endpoint_auth_methods_supported"],
            json!([
                "client_secret_post",
                "client_secret_basic",
                "private_key_jwt"
            ])
        );
        assert!(
            discovery["grant_types_supported"]
                .as_array()
                .unwrap()
                .contains(&json!("client_credentials"))
        );
    }

    #[tokio::test]
    async fn other_paths_and_methods_are_404_json() {
        let idp = new_idp(options());

        for path in ["/", "/oauth/token", "/.well-known/jwks"] {
            let answer = get(&idp, path).await;
            assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(answer.json()["error"], "not_found");
        }
        assert_eq!(idp.token_requests(), 0);
    }
}
