//! `behest-agent doctor`: walks the chain a token goes through — the configuration, the client
//! secret (or private key) and its permissions, the IdP's endpoints and keys, the grant, every claim
//! of the token, the daemon and its socket, the upstream — and prints one line per check: `✓ what`,
//! `✗ what: problem` followed by an indented `fix:` line, or `·` for a fact that is neither.
//!
//! It spends at most one grant, and none when a valid token is cached on disk or held by the daemon;
//! it never writes the disk cache; it never prints the token, the secret or an assertion. Exit 0 when
//! every check passes, 1 when one fails, 2 when the configuration cannot be loaded at all.

use std::fmt::Display;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};

use super::{CliResult, Global, find_daemon, init_cli_logging};
use crate::auth::grant::sanitize;
use crate::auth::http::describe_reqwest;
use crate::auth::{GrantError, ResolvedEndpoints};
use crate::clock::SharedClock;
use crate::config::{
    ClientAuth, ConfigError, Endpoints, Provider, SecretSource, Settings, UidCheck,
};
use crate::control::ControlClient;
use crate::control::server::expires_words;
use crate::token::claims::UID_ACTION;
use crate::token::{CheckError, Claims, TokenSource, Verifier, rfc3339};

#[derive(Debug, clap::Args)]
pub struct Args {}

/// Bound on the upstream check (the proxy's own `upstream_timeout` is sized for long completions).
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound on an upstream answer doctor reads.
const MAX_BODY: usize = 256 * 1024;
/// What the config loader appends to an unknown-key error.
const UNKNOWN_KEY_HINT: &str =
    " (remove or correct the key; config/behest-agent.toml lists every key)";
/// The Behest claims every token should carry, besides the uid claim.
const BEHEST_CLAIMS: [&str; 3] = ["tid", "pid", "tier"];

pub async fn run(g: &Global, _args: Args) -> CliResult {
    init_cli_logging(g);
    let mut r = Report::default();
    let settings = match g.load() {
        Ok(s) => s,
        Err(e) => {
            let (problem, fix) = config_problem(&e);
            r.fail("config", problem, fix);
            return Ok(ExitCode::from(2));
        }
    };
    match &settings.path {
        Some(p) => r.pass(format!("config: {}", p.display())),
        None => r.pass("config: environment only (no config file)"),
    }
    let secret_path = match &settings.auth.secret {
        SecretSource::File { path, .. } => Some(path.display().to_string()),
        _ => None,
    };
    for w in &settings.warnings {
        // The secret file's permissions get their own check below.
        if secret_path.as_ref().is_none_or(|p| !w.contains(p.as_str())) {
            r.info(format!("config: {w}"));
        }
    }
    check_credentials(&mut r, &settings);

    let clock = crate::clock::system();
    let source = match TokenSource::new(&settings, clock.clone()) {
        Ok(s) => s,
        Err(e) => {
            r.fail(
                "HTTPS client",
                e,
                "check proxy.ca_file: it must be a readable PEM file of CA certificates",
            );
            return Ok(r.exit_code());
        }
    };
    let idp = check_idp(&mut r, &settings, &source).await;

    // Asked now, reported after the token: a running daemon can spare the grant.
    let daemon = find_daemon(Some(&settings)).await;
    let daemon_status = match &daemon {
        Some(c) => match c.call(Method::GET, "/v1/status").await {
            Ok((StatusCode::OK, v)) => Some(v),
            _ => None,
        },
        None => None,
    };

    let mut servable: Option<SecretString> = None;
    match &idp {
        Some(idp) => {
            let daemon_ref = daemon.as_ref().zip(daemon_status.as_ref());
            if let Some(token) = obtain(&mut r, &settings, &source, daemon_ref, idp.jwks_ok).await
                && check_token(&mut r, &settings, &source, &idp.endpoints, &token, &clock).await
            {
                servable = Some(token);
            }
        }
        None => r.info("grant and claims: not checked (the IdP's endpoints are not known)"),
    }

    check_daemon(&mut r, &settings, daemon.as_ref(), daemon_status.as_ref());
    check_upstream(&mut r, &settings, servable.as_ref()).await;
    Ok(r.exit_code())
}

/// Prints the check lines as they come and remembers whether one failed.
#[derive(Default)]
struct Report {
    failed: bool,
}

impl Report {
    fn pass(&mut self, what: impl Display) {
        println!("✓ {what}");
    }

    fn info(&mut self, what: impl Display) {
        println!("· {what}");
    }

    fn fail(&mut self, what: impl Display, problem: impl Display, fix: impl Display) {
        self.failed = true;
        let problem = problem.to_string();
        let mut lines = problem.lines();
        println!("✗ {what}: {}", lines.next().unwrap_or_default());
        for l in lines {
            println!("  {l}");
        }
        let fix = fix.to_string();
        let mut lines = fix.lines();
        println!("  fix: {}", lines.next().unwrap_or_default());
        for l in lines {
            println!("       {l}");
        }
    }

    fn exit_code(&self) -> ExitCode {
        if self.failed {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        }
    }
}

/// The problem and its fix for a configuration that does not load.
fn config_problem(e: &ConfigError) -> (String, String) {
    match e {
        ConfigError::Read { .. } => (
            e.to_string(),
            "check the path given with --config or BEHEST_AGENT_CONFIG, and that this user may read it".into(),
        ),
        ConfigError::Parse { file, message } if message.contains("unknown field") => (
            // The loader appends this fix to the message; it goes on the fix line here.
            format!("{file}: {}", message.strip_suffix(UNKNOWN_KEY_HINT).unwrap_or(message)),
            "remove or correct that key (config/behest-agent.toml lists every key)".into(),
        ),
        ConfigError::Parse { .. } => (
            e.to_string(),
            "correct the TOML (or the --set / BEHEST_AGENT__… value) named above".into(),
        ),
        ConfigError::Missing { file, key, hint } => (format!("{file}: `{key}` is missing"), hint.clone()),
        ConfigError::Invalid { key, .. } => (
            e.to_string(),
            format!(
                "correct `{key}` in the file, or its environment variable {}",
                env_var(key)
            ),
        ),
    }
}

/// `auth.client_id` → `BEHEST_AGENT__AUTH__CLIENT_ID`.
fn env_var(key: &str) -> String {
    format!("BEHEST_AGENT__{}", key.replace('.', "__").to_uppercase())
}

/// The client secret (or private key): found, readable, and not readable by others.
fn check_credentials(r: &mut Report, s: &Settings) {
    match (&s.auth.client_auth, &s.auth.secret) {
        (ClientAuth::PrivateKeyJwt(key), _) => {
            let path = &key.path;
            match std::fs::File::open(path) {
                Ok(_) => r.pass(format!(
                    "private key: {} ({:?}{})",
                    path.display(),
                    key.alg,
                    key.key_id
                        .as_ref()
                        .map(|k| format!(", key id {k}"))
                        .unwrap_or_default()
                )),
                Err(e) => r.fail(
                    format!("private key {}", path.display()),
                    format!("cannot read it: {e}"),
                    format!(
                        "make {} readable by the user the agent runs as (auth.private_key_file)",
                        path.display()
                    ),
                ),
            }
            check_mode(r, "private key file", path);
        }
        (_, SecretSource::File { path, key }) => {
            let opened = std::fs::File::open(path).and_then(|f| f.metadata());
            match opened {
                Ok(m) if m.len() == 0 => r.fail(
                    format!("client secret {}", path.display()),
                    "the file is empty",
                    format!(
                        "put the application's Client Secret in {} ({key})",
                        path.display()
                    ),
                ),
                Ok(_) => r.pass(format!("client secret: {} ({key})", path.display())),
                Err(e) => r.fail(
                    format!("client secret {}", path.display()),
                    format!("cannot read it: {e}"),
                    format!(
                        "make {} readable by the user the agent runs as ({key})",
                        path.display()
                    ),
                ),
            }
            check_mode(r, "client secret file", path);
        }
        (_, SecretSource::Env { var, .. }) => {
            r.pass(format!("client secret: environment variable {var}"));
            r.info(
                "a secret in the environment can be read by every process of this user; a 0600 file (auth.client_secret_file) or the systemd credential `client-secret` keeps it narrower",
            );
        }
        (_, SecretSource::None) => r.fail(
            "client secret",
            "none is configured",
            "set auth.client_secret_file (or the systemd credential `client-secret`, or BEHEST_AGENT_CLIENT_SECRET)",
        ),
    }
}

/// ✗ when a file holding a secret can be read (or written) by every user.
fn check_mode(r: &mut Report, what: &str, path: &Path) {
    let Ok(meta) = std::fs::metadata(path) else {
        return; // Already reported as unreadable.
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o006 != 0 {
        let how = if mode & 0o004 != 0 {
            "readable"
        } else {
            "writable"
        };
        r.fail(
            format!("{what} permissions"),
            format!(
                "{} is {how} by every user (mode {mode:04o})",
                path.display()
            ),
            format!("chmod 600 {}", shell_quote(path)),
        );
    } else {
        r.pass(format!("{what} permissions: mode {mode:04o}"));
    }
}

fn shell_quote(path: &Path) -> String {
    let s = path.display().to_string();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:@%,".contains(c))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// What the IdP checks found out.
struct IdpFacts {
    endpoints: ResolvedEndpoints,
    /// The JWKS answered with keys (or is not needed).
    jwks_ok: bool,
}

/// The key that names where the IdP is, for fixes.
fn idp_key(s: &Settings) -> &'static str {
    match (&s.auth.provider, &s.auth.endpoints) {
        (Provider::Auth0, _) => "auth.domain",
        (_, Endpoints::Discover { .. }) => "auth.issuer",
        (_, Endpoints::Fixed { .. }) => "auth.token_url",
    }
}

fn reach_fix(s: &Settings) -> String {
    format!(
        "check {} and that this machine reaches the IdP (DNS, firewall; the agent connects directly, without HTTP(S)_PROXY); for an IdP behind a private CA, set proxy.ca_file",
        idp_key(s)
    )
}

/// Discovery (when configured), the token endpoint's reachability, and the JWKS.
async fn check_idp(r: &mut Report, s: &Settings, source: &TokenSource) -> Option<IdpFacts> {
    let grant = source.grant();
    let endpoints = match grant.endpoints().await {
        Ok(e) => e.clone(),
        Err(e) => {
            let problem = match &e {
                GrantError::Discovery { url, message } => format!("{url}: {message}"),
                other => other.to_string(),
            };
            r.fail(
                "OIDC discovery",
                problem,
                "check auth.issuer (the IdP's issuer URL, exactly as its discovery document names it) and that this machine reaches it; or set auth.token_url and auth.jwks_url to skip discovery",
            );
            return None;
        }
    };
    if let Endpoints::Discover { issuer } = &s.auth.endpoints {
        r.pass(format!("OIDC discovery: {issuer}"));
    }

    let token_url = &endpoints.token_url;
    // Any HTTP answer proves the endpoint is there; grants are POSTs, this GET spends nothing.
    match grant.http().get(token_url.clone()).send().await {
        Ok(_) => r.pass(format!("token endpoint: {token_url} (reachable)")),
        Err(e) => r.fail(
            format!("token endpoint {token_url}"),
            format!("unreachable: {}", describe_reqwest(&e)),
            reach_fix(s),
        ),
    }

    let jwks_ok = match &endpoints.jwks_url {
        None if s.token.verify_signature => {
            r.fail(
                "JWKS",
                "no JWKS URL is known, so the token's signature cannot be checked",
                "set auth.jwks_url (or auth.issuer, for discovery)",
            );
            false
        }
        None => {
            r.info("JWKS: none (token.verify_signature = false)");
            true
        }
        Some(url) => match fetch_jwks(grant.http(), url).await {
            Ok(0) => {
                r.fail(
                    format!("JWKS {url}"),
                    "it holds no keys",
                    format!(
                        "check {} names the IdP that signs the tokens",
                        if s.auth.provider == Provider::Auth0 {
                            "auth.domain"
                        } else {
                            "auth.jwks_url"
                        }
                    ),
                );
                false
            }
            Ok(n) => {
                r.pass(format!(
                    "JWKS: {url} ({n} key{})",
                    if n == 1 { "" } else { "s" }
                ));
                true
            }
            Err(JwksProblem::Unreachable(m)) => {
                r.fail(
                    format!("JWKS {url}"),
                    format!("unreachable: {m}"),
                    reach_fix(s),
                );
                false
            }
            Err(JwksProblem::Answer(m)) => {
                r.fail(
                    format!("JWKS {url}"),
                    m,
                    "check auth.jwks_url (or auth.domain / auth.issuer) names the IdP's JWKS; if the IdP is having an outage, try again later",
                );
                false
            }
        },
    };
    Some(IdpFacts { endpoints, jwks_ok })
}

enum JwksProblem {
    Unreachable(String),
    Answer(String),
}

/// The number of keys the JWKS at `url` holds.
async fn fetch_jwks(http: &reqwest::Client, url: &url::Url) -> Result<usize, JwksProblem> {
    let response = http
        .get(url.clone())
        .send()
        .await
        .map_err(|e| JwksProblem::Unreachable(describe_reqwest(&e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(JwksProblem::Answer(format!(
            "the IdP answered HTTP {status}"
        )));
    }
    let set: jsonwebtoken::jwk::JwkSet = response
        .json()
        .await
        .map_err(|e| JwksProblem::Answer(format!("not a JWKS: {e}")))?;
    Ok(set.keys.len())
}

/// A token to check: a valid cached one, else the daemon's, else one new grant (never cached).
async fn obtain(
    r: &mut Report,
    s: &Settings,
    source: &TokenSource,
    daemon: Option<(&ControlClient, &Value)>,
    jwks_ok: bool,
) -> Option<SecretString> {
    if let Some(t) = source.load_cache().await {
        let path = s
            .token
            .cache_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        r.pass(format!(
            "token: a valid one from the disk cache {path} (no grant made)"
        ));
        return Some(t.secret().clone());
    }
    if let Some((client, status)) = daemon
        && status.pointer("/token/ready").and_then(Value::as_bool) == Some(true)
        && let Ok((StatusCode::OK, body)) = client.call(Method::GET, "/v1/token").await
        && let Some(token) = body.get("access_token").and_then(Value::as_str)
    {
        r.pass("token: the running daemon's (no grant made)");
        return Some(SecretString::from(token.to_string()));
    }
    if !jwks_ok && s.token.cache_file.as_ref().is_some_and(|p| p.exists()) {
        r.info(
            "grant: not tried: a cached token may still be good but cannot be checked without the JWKS; fix the JWKS first",
        );
        return None;
    }
    match source.grant().request().await {
        Ok(issued) => {
            r.pass(format!(
                "grant: the IdP issued a token ({}; not cached)",
                s.auth.client_auth.name()
            ));
            Some(issued.access_token)
        }
        Err(e) => {
            let (problem, fix) = grant_problem(&e, s);
            r.fail("grant", problem, fix);
            None
        }
    }
}

/// The problem and its fix for a failed grant, keeping the IdP's own error.
fn grant_problem(e: &GrantError, s: &Settings) -> (String, String) {
    let a = &s.auth;
    match e {
        GrantError::Refused {
            status,
            error,
            description,
            retry_after,
        } => {
            let problem = format!(
                "the IdP refused it with `{error}`{} (HTTP {status})",
                description
                    .as_ref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            );
            let audience = a
                .audience
                .as_deref()
                .or(a.resource.as_deref())
                .unwrap_or("(auth.audience is not set)");
            let fix = match error.as_str() {
                "invalid_client" => match &a.client_auth {
                    ClientAuth::PrivateKeyJwt(key) => format!(
                        "check auth.client_id (`{}`) and the private key {}: its public key must be registered with the application (Auth0: Applications > the application > Credentials), and auth.key_id must name it",
                        a.client_id,
                        key.path.display()
                    ),
                    _ => format!(
                        "check auth.client_id (`{}`) and the client secret in {}: they must be the machine-to-machine application's Client ID and Client Secret (Auth0: Applications > the application > Settings)",
                        a.client_id,
                        a.secret.describe()
                    ),
                },
                "unauthorized_client" => "enable the client-credentials grant for the application (Auth0: Applications > the application > Advanced Settings > Grant Types > Client Credentials)".into(),
                "access_denied" => format!(
                    "authorize the application for the API `{audience}` (Auth0: Applications > APIs > the API > Machine to Machine Applications), and check auth.audience is that API's identifier"
                ),
                "invalid_scope" => "ask only for scopes the API grants this application (auth.scope), or remove auth.scope".into(),
                "invalid_target" => "auth.resource is not a resource this IdP knows: correct it, or use auth.audience".into(),
                "too_many_requests" => format!(
                    "the tenant's rate limit or machine-to-machine quota is spent: wait{}, and keep the disk cache (token.cache_file) so restarts and CLI calls reuse the token",
                    retry_after
                        .map(|d| format!(" {}", humantime::format_duration(d)))
                        .unwrap_or_default()
                ),
                "temporarily_unavailable" | "server_error" => {
                    "the IdP is having trouble: try again later (the daemon retries by itself)".into()
                }
                _ => "read the IdP's error above: it concerns the application's settings in the tenant or what the agent asks for (auth.audience, auth.scope, auth.extra_params)".into(),
            };
            (problem, fix)
        }
        GrantError::Http {
            status, snippet, ..
        } => (
            format!("the token endpoint answered HTTP {status}: {snippet}"),
            format!(
                "check {} names the IdP itself, not a proxy or a web page; if the IdP is down, try again later",
                idp_key(s)
            ),
        ),
        GrantError::Transport { url, message } => {
            (format!("cannot reach {url}: {message}"), reach_fix(s))
        }
        GrantError::Malformed(m) => (
            format!("the token response is malformed: {m}"),
            format!("check {} names an OAuth2 token endpoint", idp_key(s)),
        ),
        GrantError::Discovery { url, message } => (
            format!("OIDC discovery at {url} failed: {message}"),
            "check auth.issuer, or set auth.token_url and auth.jwks_url".into(),
        ),
        GrantError::Secret { from, message } => (
            format!("cannot read the client secret from {from}: {message}"),
            format!("put the application's Client Secret in {from}, readable by this user only (mode 0600)"),
        ),
        GrantError::Assertion(m) => (
            format!("cannot sign the client assertion: {m}"),
            "check auth.private_key_file and auth.signing_alg match (an RSA key for RS*/PS*, an EC P-256 key for ES256)".into(),
        ),
    }
}

/// The format, the signature and every claim. True when the agent would serve the token.
async fn check_token(
    r: &mut Report,
    s: &Settings,
    source: &TokenSource,
    endpoints: &ResolvedEndpoints,
    token: &SecretString,
    clock: &SharedClock,
) -> bool {
    let audience = s.auth.audience.clone().or_else(|| s.auth.resource.clone());
    let verifier = Verifier::new(
        s.token.clone(),
        audience.clone(),
        source.grant().http().clone(),
        clock.clone(),
    );
    let verdict = verifier.check(token, endpoints).await;
    let claims = match &verdict {
        Ok((claims, _)) => claims.clone(),
        // The signature held; the claim checks below say which claim failed.
        Err(e) if is_claim_error(e) => match decode_claims(token, &s.token.uid_claim) {
            Some(c) => c,
            None => {
                r.fail(
                    "token format",
                    "the payload cannot be read",
                    format!("check {} names the IdP", idp_key(s)),
                );
                return false;
            }
        },
        Err(e) => {
            report_unverified(r, s, e);
            return false;
        }
    };

    if s.token.verify_signature {
        let how = jsonwebtoken::decode_header(token.expose_secret())
            .map(|h| {
                format!(
                    " ({:?}{})",
                    h.alg,
                    h.kid.map(|k| format!(", key id {k}")).unwrap_or_default()
                )
            })
            .unwrap_or_default();
        r.pass(format!("signature: verified against the JWKS{how}"));
    } else {
        r.info("signature: not checked (token.verify_signature = false)");
    }
    let failed = verdict.as_ref().err();
    check_claims(
        r,
        s,
        &claims,
        endpoints.issuer.as_deref(),
        audience.as_deref(),
        clock.now(),
        failed,
    );
    verdict.is_ok()
}

/// A claim failed (so the format and the signature held).
fn is_claim_error(e: &CheckError) -> bool {
    matches!(
        e,
        CheckError::Expired(_)
            | CheckError::Audience { .. }
            | CheckError::Issuer { .. }
            | CheckError::UidMissing { .. }
            | CheckError::UidMismatch { .. }
    )
}

/// A token whose format or signature failed: its claims cannot be trusted, so none is shown.
fn report_unverified(r: &mut Report, s: &Settings, e: &CheckError) {
    let same_issuer =
        "make auth.domain (or auth.issuer / auth.jwks_url) name the IdP that issues the token";
    match e {
        CheckError::Opaque => r.fail(
            "token format",
            "the access token is opaque, not a JWT",
            "set auth.audience to the Behest API identifier: Auth0 issues opaque tokens when no audience is asked for",
        ),
        CheckError::Malformed(m) => r.fail(
            "token format",
            format!("not a well-formed JWT: {m}"),
            format!(
                "check {} names the IdP, and that the API issues signed JWTs (Auth0: an API with signing algorithm RS256)",
                idp_key(s)
            ),
        ),
        CheckError::Algorithm(alg) => r.fail(
            "signature",
            format!("the token is signed with {alg}, which cannot be checked against public keys"),
            "set the API's signing algorithm to RS256 (Auth0: Applications > APIs > the API > Settings)",
        ),
        CheckError::Jwks(m) => r.fail(
            "signature",
            format!("cannot get the issuer's JWKS: {m}"),
            "fix the JWKS check above (auth.jwks_url, or the IdP's reachability)",
        ),
        CheckError::UnknownKid(kid) => r.fail(
            "signature",
            format!("the token's key id `{kid}` is not in the issuer's JWKS"),
            format!("the token comes from another IdP or tenant: {same_issuer}"),
        ),
        CheckError::Signature(m) => r.fail(
            "signature",
            format!("it does not verify against the issuer's JWKS: {m}"),
            format!("the token was not signed by this issuer: {same_issuer}"),
        ),
        other => r.fail("token", other.to_string(), "see the message"),
    }
}

/// The payload, for display once the signature has been checked.
fn decode_claims(token: &SecretString, uid_claim: &str) -> Option<Claims> {
    let payload = token.expose_secret().split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let raw: Map<String, Value> = serde_json::from_slice(&bytes).ok()?;
    let exp = raw.get("exp").and_then(Value::as_u64).unwrap_or(0);
    let uid = raw.get(uid_claim).and_then(Value::as_str).map(String::from);
    Some(Claims { exp, raw, uid })
}

/// One line per claim, with the same rules as [`Verifier::check`]; `failed` is its verdict, which
/// wins when it names a claim.
fn check_claims(
    r: &mut Report,
    s: &Settings,
    claims: &Claims,
    issuer: Option<&str>,
    audience: Option<&str>,
    now: SystemTime,
    failed: Option<&CheckError>,
) {
    // exp
    let exp_at = crate::clock::from_unix(claims.exp).unwrap_or(UNIX_EPOCH);
    let left = match exp_at.duration_since(now) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    if exp_at > now && !matches!(failed, Some(CheckError::Expired(_))) {
        r.pass(format!(
            "exp: expires {} ({})",
            expires_words(left),
            rfc3339(exp_at)
        ));
    } else {
        r.fail(
            "exp",
            format!("the token expired {} ({})", expires_words(left), rfc3339(exp_at)),
            "check this machine's clock (`timedatectl status`); if it is right, the IdP issues tokens that are already expired: check the API's token lifetime",
        );
    }

    // aud
    let got = claims.audiences();
    match audience {
        Some(want)
            if got.iter().any(|a| a == want)
                && !matches!(failed, Some(CheckError::Audience { .. })) =>
        {
            r.pass(format!("aud: includes {want}"))
        }
        Some(want) => r.fail(
            "aud",
            format!("{got:?} does not include `{want}`"),
            "set auth.audience to the Behest API identifier (Auth0: Applications > APIs > the API > Identifier), and authorize the application for that API",
        ),
        None => r.info(format!(
            "aud: {got:?} (not checked: auth.audience is not set)"
        )),
    }

    // iss
    let got = claims.str("iss").unwrap_or_default();
    match issuer {
        Some(want)
            if got.trim_end_matches('/') == want.trim_end_matches('/')
                && !matches!(failed, Some(CheckError::Issuer { .. })) =>
        {
            r.pass(format!("iss: {got}"))
        }
        Some(want) => r.fail(
            "iss",
            format!("`{}` is not `{want}`", sanitize(got)),
            "set auth.domain (Auth0) or auth.issuer (OIDC) to the IdP that issues the token",
        ),
        None => r.info(format!(
            "iss: {} (not checked: no issuer is configured)",
            sanitize(got)
        )),
    }

    // uid
    let t = &s.token;
    let name = &t.uid_claim;
    let whose = if t.expected_uid == s.auth.client_id {
        "the client id"
    } else {
        "token.expected_uid"
    };
    let served_anyway = if t.uid_check == UidCheck::Warn {
        " (token.uid_check = \"warn\" serves such tokens anyway)"
    } else {
        ""
    };
    match &claims.uid {
        Some(got) if *got == t.expected_uid => r.pass(format!("{name}: {got} ({whose})")),
        Some(got) => r.fail(
            name,
            format!(
                "`{}` is not {whose} `{}`{served_anyway}",
                sanitize(got),
                t.expected_uid
            ),
            format!(
                "make the credentials-exchange Action set it to event.client.client_id (or set token.expected_uid if another value is intended):\n{UID_ACTION}"
            ),
        ),
        None => r.fail(
            name,
            format!(
                "the token has no `{name}` claim, and Behest identifies machines by it{served_anyway}"
            ),
            format!(
                "add this Action to Auth0's Machine to Machine (credentials exchange) trigger and to that flow:\n{UID_ACTION}"
            ),
        ),
    }

    // tid, pid, tier, and any other required claim
    let mut names: Vec<&str> = BEHEST_CLAIMS.to_vec();
    for n in &t.required_claims {
        if !names.contains(&n.as_str()) {
            names.push(n);
        }
    }
    for n in names.into_iter().filter(|n| *n != name.as_str()) {
        match claims.raw.get(n) {
            Some(v) => {
                let text = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                r.pass(format!("{n}: {}", sanitize(&text)));
            }
            None => r.fail(
                n,
                format!("the token has no `{n}` claim; Behest may refuse it"),
                format!(
                    "set it in the credentials-exchange Action with api.accessToken.setCustomClaim(\"{n}\", …) (README: Auth0 walkthrough, step 3)"
                ),
            ),
        }
    }
}

/// The daemon answering on the control socket, and the socket's mode.
fn check_daemon(
    r: &mut Report,
    s: &Settings,
    daemon: Option<&ControlClient>,
    status: Option<&Value>,
) {
    let socket = &s.control.socket;
    let Some(_) = daemon else {
        r.info(format!(
            "daemon: not running (nothing answers on {})",
            socket.display()
        ));
        return;
    };
    match status {
        None => r.fail(
            "daemon",
            format!(
                "something answers on {} but not with the agent's control API",
                socket.display()
            ),
            "stop whatever listens there, or set control.socket to another path",
        ),
        Some(v) => {
            let d = &v["daemon"];
            let version = d["version"].as_str().unwrap_or("?");
            r.pass(format!(
                "daemon: pid {}, version {version}, on {}",
                d["pid"],
                socket.display()
            ));
            if version != env!("CARGO_PKG_VERSION") {
                r.info(format!(
                    "daemon: it runs version {version}, this binary is {} (restart it after an upgrade)",
                    env!("CARGO_PKG_VERSION")
                ));
            }
            if v.pointer("/token/ready").and_then(Value::as_bool) != Some(true) {
                let why = v
                    .pointer("/token/last_error")
                    .and_then(Value::as_str)
                    .unwrap_or("no token yet");
                r.fail(
                    "daemon's token",
                    format!("the daemon holds no valid token: {why}"),
                    "fix the cause above; the daemon recovers by itself (or run `behest-agent refresh`); its log: `journalctl -u behest-agent`",
                );
            }
        }
    }
    if let Ok(meta) = std::fs::metadata(socket) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o002 != 0 {
            r.fail(
                "control socket permissions",
                format!(
                    "{} is mode {mode:04o}: every user can connect and take the token",
                    socket.display()
                ),
                "set control.socket_mode = \"0660\" and restart the daemon",
            );
        } else {
            r.pass(format!(
                "control socket: {} mode {mode:04o}",
                socket.display()
            ));
        }
    }
}

/// `GET {upstream}/v1/models` with the token.
async fn check_upstream(r: &mut Report, s: &Settings, token: Option<&SecretString>) {
    let Some(base) = &s.proxy.upstream else {
        r.info(
            "upstream: proxy.upstream is not set (tokens only; the proxy has nowhere to forward)",
        );
        return;
    };
    let url = format!("{}/v1/models", base.as_str().trim_end_matches('/'));
    let Some(token) = token else {
        r.info(format!(
            "upstream: GET {url} not tried (no token that passes the checks; the agent never sends one that fails them)"
        ));
        return;
    };
    let http = match crate::auth::http::client(UPSTREAM_TIMEOUT, s.proxy.ca_file.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            r.fail(
                "upstream HTTPS client",
                e,
                "check proxy.ca_file: it must be a readable PEM file of CA certificates",
            );
            return;
        }
    };
    let what = format!("upstream GET {url}");
    let mut response = match http
        .get(&url)
        .bearer_auth(token.expose_secret())
        .send()
        .await
    {
        Ok(resp) => resp,
        Err(e) => {
            r.fail(
                what,
                format!("unreachable: {}", describe_reqwest(&e)),
                "check proxy.upstream (Behest's base URL) and that this machine reaches it (DNS, firewall; no HTTP(S)_PROXY is used); for an upstream behind a private CA, set proxy.ca_file",
            );
            return;
        }
    };
    let status = response.status();
    let location = response
        .headers()
        .get(http::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(sanitize);
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        if body.len() + chunk.len() > MAX_BODY {
            break;
        }
        body.extend_from_slice(&chunk);
    }
    let doc: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if status.is_success() {
        let models = doc
            .get("data")
            .and_then(Value::as_array)
            .map(|d| format!(", {} models", d.len()))
            .unwrap_or_default();
        r.pass(format!("upstream: GET {url} → {status}{models}"));
        return;
    }
    let detail = doc
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map(|m| format!(": {}", sanitize(m)))
        .unwrap_or_default();
    let fix = match status.as_u16() {
        401 => "the upstream refused the token: check auth.audience is the API identifier Behest expects, and that the claims above (uid, tid, pid, tier) are the ones Behest knows this machine by".to_string(),
        403 => "the token is valid but not allowed there: check the tid, pid and tier claims (tenant, project, plan) with Behest".to_string(),
        404 => "check proxy.upstream: it is Behest's base URL, without /v1".to_string(),
        429 => "the upstream rate-limits this machine: try again later".to_string(),
        300..=399 => format!(
            "set proxy.upstream to where it redirects{} (the agent does not follow redirects)",
            location.map(|l| format!(" ({l})")).unwrap_or_default()
        ),
        500..=599 => "the upstream is failing: try again later".to_string(),
        _ => "check proxy.upstream is Behest's base URL".to_string(),
    };
    r.fail(what, format!("HTTP {status}{detail}"), fix);
}
