//! `behest-agent doctor`: walks the chain a token goes through — the configuration, the client
//! secret (or private key) and its permissions, the IdP's endpoints and keys, the grant, every claim
//! of the token, the daemon and its socket, the upstream — and prints one line per check: `✓ what`,
//! `✗ what: problem` followed by an indented `fix:` line, or `·` for a fact that is neither.
//!
//! The problems and fixes of the agent's own errors are theirs ([`crate::config::ConfigError::fix`],
//! [`GrantError::fix`], [`CheckError::fix`]) and the claim rules are the [`Verifier`]'s: doctor only
//! adds the values from this configuration that a fix concerns, and the checks no error covers
//! (file permissions, the daemon, the upstream).
//!
//! It spends at most one grant, and none when a valid token is cached on disk or held by the daemon;
//! it never writes the disk cache (a probe file beside it tells whether it could be); it never
//! prints the token, the secret or an assertion. Exit 0 when every check passes, 1 when one fails,
//! 2 when the configuration cannot be loaded at all.

use std::fmt::Display;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Method;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::{CliResult, Global, daemon, init_cli_logging};
use crate::auth::grant::sanitize;
use crate::auth::http::describe_reqwest;
use crate::auth::{GrantError, ResolvedEndpoints};
use crate::config::{AuthSettings, ClientAuth, Endpoints, SecretSource, Settings, UidCheck};
use crate::control::server::expires_words;
use crate::control::{ControlError, Daemon};
use crate::fleet::Peek;
use crate::token::jwks::Jwks;
use crate::token::{CheckError, Claims, TokenSource, Verifier, rfc3339};

#[derive(Debug, clap::Args)]
pub struct Args {}

/// Bound on the upstream check (the proxy's own `upstream_timeout` is sized for long completions).
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound on an upstream answer doctor reads.
const MAX_BODY: usize = 256 * 1024;
/// The Behest claims every token should carry, besides the uid claim.
const BEHEST_CLAIMS: [&str; 3] = ["tid", "pid", "tier"];
/// The fix when an HTTPS client cannot be built (the CA file is the only input that can fail).
const CA_FILE_FIX: &str = "check proxy.ca_file: it must be a readable PEM file of CA certificates";

pub async fn run(g: &Global, _args: Args) -> CliResult {
    init_cli_logging(g);
    let mut r = Report::default();
    let settings = match g.load() {
        Ok(s) => s,
        Err(e) => {
            // No configuration of its own (none was named): a running daemon, such as
            // `behest-agent dev`, is what the user wants checked.
            if g.config_path().is_none() {
                match daemon(g, None).await {
                    Ok(Some(d)) => {
                        check_daemon_alone(&mut r, &d).await;
                        return Ok(r.exit_code());
                    }
                    // The configuration's own error, said once on the line below.
                    Ok(None) | Err(ControlError::Config(_)) => {}
                    Err(e) => r.fail("daemon", e.problem(), e.fix()),
                }
            }
            r.fail("config", e.problem(), e.fix());
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
    match settings.proxy.egress.describe() {
        Some(how) => r.info(format!("egress: {how}")),
        None => r.info("egress: direct (no [egress], no HTTPS_PROXY / http_proxy / ALL_PROXY)"),
    }

    let source = match TokenSource::new(&settings, crate::clock::system()) {
        Ok(s) => s,
        Err(e) => {
            r.fail("HTTPS client", e, CA_FILE_FIX);
            return Ok(r.exit_code());
        }
    };
    let idp = check_idp(&mut r, &settings, &source).await;

    // Asked now, reported after the token: a running daemon can spare the grant (only one that
    // serves this configuration's identity).
    let daemon = daemon(g, Some(&settings)).await;

    let mut servable: Option<SecretString> = None;
    match &idp {
        Some(idp) => {
            let found = daemon.as_ref().ok().and_then(Option::as_ref);
            if let Some((token, cached)) =
                obtain(&mut r, &settings, &source, found, idp.jwks_ok).await
                && check_token(
                    &mut r,
                    &settings,
                    source.verifier(),
                    &idp.endpoints,
                    &token,
                    cached,
                )
                .await
            {
                servable = Some(token);
            }
        }
        None => r.info("grant and claims: not checked (the IdP's endpoints are not known)"),
    }

    check_daemon(&mut r, &settings, &daemon);
    let daemon_status = daemon
        .as_ref()
        .ok()
        .and_then(Option::as_ref)
        .map(Daemon::status);
    check_cache(&mut r, &settings, &source, daemon_status).await;
    check_fleet(&mut r, &source).await;
    check_upstream(&mut r, &settings, servable.as_ref()).await;
    Ok(r.exit_code())
}

/// Prints the check lines as they come and remembers whether one failed, or could not be written.
#[derive(Default)]
struct Report {
    failed: bool,
    /// Why stdout took no more lines (a reader that went away, `doctor | head -1`, is no failure).
    lost: Option<std::io::Error>,
}

impl Report {
    fn say(&mut self, line: impl Display) {
        use std::io::Write as _;
        if self.lost.is_none()
            && let Err(e) =
                writeln!(std::io::stdout(), "{line}").and_then(|()| std::io::stdout().flush())
            && e.kind() != std::io::ErrorKind::BrokenPipe
        {
            self.lost = Some(e);
        }
    }

    fn pass(&mut self, what: impl Display) {
        self.say(format_args!("✓ {what}"));
    }

    fn info(&mut self, what: impl Display) {
        self.say(format_args!("· {what}"));
    }

    fn fail(&mut self, what: impl Display, problem: impl Display, fix: impl Display) {
        self.failed = true;
        let problem = problem.to_string();
        let mut lines = problem.lines();
        self.say(format_args!(
            "✗ {what}: {}",
            lines.next().unwrap_or_default()
        ));
        for l in lines {
            self.say(format_args!("  {l}"));
        }
        let fix = fix.to_string();
        let mut lines = fix.lines();
        self.say(format_args!("  fix: {}", lines.next().unwrap_or_default()));
        for l in lines {
            self.say(format_args!("       {l}"));
        }
    }

    /// A failed check of the token: the check's own problem and fix.
    fn refused(&mut self, what: impl Display, e: &CheckError) {
        self.fail(what, e.problem(), e.fix());
    }

    fn exit_code(&self) -> ExitCode {
        if let Some(e) = &self.lost {
            errln!("error: cannot write the output: {e}");
            ExitCode::from(1)
        } else if self.failed {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        }
    }
}

/// The client secret (or private key): found, readable, and not readable by others.
fn check_credentials(r: &mut Report, s: &Settings) {
    let (what, path) = match (&s.auth.client_auth, &s.auth.secret) {
        (ClientAuth::PrivateKeyJwt(key), _) => {
            let id = key.key_id.as_ref().map(|k| format!(", key id {k}"));
            r.pass(format!(
                "private key: {} ({:?}{})",
                key.path.display(),
                key.alg,
                id.unwrap_or_default()
            ));
            ("private key file", &key.path)
        }
        (_, SecretSource::File { path, key }) => {
            // The loader read it; it may have changed since.
            let unreadable = match std::fs::read_to_string(path) {
                Ok(text) => crate::config::secret_text(&text).err().map(String::from),
                Err(e) => Some(e.to_string()),
            };
            match unreadable {
                None => r.pass(format!("client secret: {} ({key})", path.display())),
                Some(message) => {
                    let from = s.auth.secret.describe();
                    let e = GrantError::Secret { from, message };
                    r.fail("client secret", e.problem(), e.fix());
                }
            }
            ("client secret file", path)
        }
        (_, SecretSource::Env { var, .. }) => {
            r.pass(format!("client secret: environment variable {var}"));
            r.info(
                "a secret in the environment can be read by every process of this user; a 0600 file (auth.client_secret_file) or the systemd credential `client-secret` keeps it narrower",
            );
            return;
        }
        // Only with private_key_jwt, above: the loader requires a secret otherwise.
        (_, SecretSource::None) => return,
    };
    check_mode(r, what, path);
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

/// Discovery (when configured), the token endpoint's reachability, and the JWKS.
async fn check_idp(r: &mut Report, s: &Settings, source: &TokenSource) -> Option<IdpFacts> {
    let grant = source.grant();
    let endpoints = match grant.endpoints().await {
        Ok(e) => e.clone(),
        Err(e) => {
            r.fail("OIDC discovery", e.problem(), e.fix());
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
        Err(e) => {
            let e = GrantError::Transport {
                url: token_url.to_string(),
                message: s
                    .proxy
                    .egress
                    .through(token_url.as_str(), describe_reqwest(&e)),
            };
            r.fail("token endpoint", e.problem(), e.fix());
        }
    }

    let jwks_ok = match &endpoints.jwks_url {
        None if s.token.verify_signature => {
            r.refused("JWKS", &CheckError::NoJwksUrl);
            false
        }
        None => {
            r.info("JWKS: none (token.verify_signature = false)");
            true
        }
        Some(url) => match Jwks::new(grant.http().clone()).fetch(url).await {
            Ok(set) if set.keys.is_empty() => {
                r.fail(
                    format!("JWKS {url}"),
                    "it holds no keys",
                    "check auth.jwks_url (or auth.domain / auth.issuer) names the IdP that signs the tokens",
                );
                false
            }
            Ok(set) => {
                let n = set.keys.len();
                r.pass(format!(
                    "JWKS: {url} ({n} key{})",
                    if n == 1 { "" } else { "s" }
                ));
                true
            }
            Err(CheckError::JwksDown(m)) => {
                let m = s.proxy.egress.through(url.as_str(), m);
                r.refused("JWKS", &CheckError::JwksDown(m));
                false
            }
            Err(e) => {
                r.refused("JWKS", &e);
                false
            }
        },
    };
    Some(IdpFacts { endpoints, jwks_ok })
}

/// A token to check: a valid cached one (with the cache's path), else the daemon's, else one new
/// grant (never cached).
async fn obtain<'s>(
    r: &mut Report,
    s: &'s Settings,
    source: &TokenSource,
    daemon: Option<&Daemon>,
    jwks_ok: bool,
) -> Option<(SecretString, Option<(&'s std::path::Path, Claims)>)> {
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
        let cached = s.token.cache_file.as_deref().map(|p| (p, t.claims.clone()));
        return Some((t.secret().clone(), cached));
    }
    if let Some(d) = daemon
        && d.status().pointer("/token/ready").and_then(Value::as_bool) == Some(true)
        && let Ok(body) = d
            .request(Method::GET, "/v1/token", Daemon::grant_wait(Some(s)))
            .await
        && let Some(token) = body.get("access_token").and_then(Value::as_str)
    {
        r.pass("token: the running daemon's (no grant made)");
        return Some((SecretString::from(token.to_string()), None));
    }
    if !jwks_ok && s.token.cache_file.as_ref().is_some_and(|p| p.exists()) {
        r.info(
            "grant: not tried: a cached token may still be good but cannot be checked without the JWKS; fix the JWKS first",
        );
        return None;
    }
    if let Some(waiting) = source.waiting(source.clock().now()).await {
        r.fail(
            "grant",
            format!("not tried: {waiting}"),
            "wait until then: the IdP asked for it, and every request before counts against the tenant's rate limit".to_string(),
        );
        return None;
    }
    match source.grant().request().await {
        Ok(issued) => {
            r.pass(format!(
                "grant: the IdP issued a token ({}; not cached)",
                s.auth.client_auth.name()
            ));
            Some((issued.access_token, None))
        }
        Err(e) => {
            r.fail("grant", e.problem(), grant_fix(&e, &s.auth));
            None
        }
    }
}

/// The grant error's fix, with the configured values it concerns.
fn grant_fix(e: &GrantError, a: &AuthSettings) -> String {
    let fix = e.fix();
    let GrantError::Refused { error, .. } = e else {
        return fix;
    };
    match e.refused_credentials().unwrap_or(error.as_str()) {
        "invalid_client" => {
            let credential = match &a.client_auth {
                ClientAuth::PrivateKeyJwt(key) => {
                    format!("the private key is {}", key.path.display())
                }
                _ => format!("the secret comes from {}", a.secret.describe()),
            };
            format!("{fix} (auth.client_id is `{}`; {credential})", a.client_id)
        }
        "access_denied" => match a.audience.as_deref().or(a.resource.as_deref()) {
            Some(audience) => format!("{fix} (the API asked for is `{audience}`)"),
            None => format!("{fix} (auth.audience is not set)"),
        },
        _ => fix,
    }
}

/// The format, the signature and every claim, by the agent's own rules. True when the agent
/// would serve the token. `cached`: the disk cache it came from, and the claims it was read with
/// (checked against the key stored with it).
async fn check_token(
    r: &mut Report,
    s: &Settings,
    verifier: &Verifier,
    endpoints: &ResolvedEndpoints,
    token: &SecretString,
    cached: Option<(&std::path::Path, Claims)>,
) -> bool {
    let mut offline = None;
    let claims = match verifier.verify(token, endpoints).await {
        Ok(claims) => claims,
        // The IdP's keys cannot be fetched now (an outage): the cached token stays in service,
        // checked against the key stored with it, as the daemon and `token` serve it.
        Err(e @ (CheckError::Jwks(_) | CheckError::JwksDown(_)))
            if let Some((_, claims)) = cached =>
        {
            offline = Some(e);
            claims
        }
        // It verified against the key stored with it, not the IdP's keys now: a key the IdP
        // withdrew, or an edited file, not a misconfigured IdP.
        Err(e @ (CheckError::Signature(_) | CheckError::UnknownKid(_)))
            if let Some((path, _)) = cached =>
        {
            r.fail(
                "signature",
                format!("the cached token does not verify against the IdP's keys now ({})", e.problem()),
                format!("delete {} (the IdP withdrew the key it was signed with, or the file was edited); the next grant replaces it", path.display()),
            );
            return false;
        }
        // Its claims cannot be trusted, so none is shown.
        Err(e) => {
            let what = match e {
                CheckError::Opaque | CheckError::Malformed(_) => "token format",
                _ => "signature",
            };
            r.refused(what, &e);
            return false;
        }
    };
    if let Some(e) = offline {
        r.pass(format!(
            "signature: verified against the key stored with the cached token (the JWKS cannot be fetched now: {})",
            e.problem()
        ));
    } else if s.token.verify_signature {
        let how = jsonwebtoken::decode_header(token.expose_secret())
            .map(|h| {
                let kid = h.kid.map(|k| format!(", key id {k}")).unwrap_or_default();
                format!(" ({:?}{kid})", h.alg)
            })
            .unwrap_or_default();
        r.pass(format!("signature: verified against the JWKS{how}"));
    } else {
        r.info("signature: not checked (token.verify_signature = false)");
    }

    let mut servable = true;
    let exp_at = crate::clock::from_unix(claims.exp).unwrap_or(UNIX_EPOCH);
    match verifier.check_expiry(&claims) {
        Ok(()) => {
            let left = exp_at
                .duration_since(SystemTime::now())
                .map(|d| d.as_secs() as i64)
                .unwrap_or_default();
            r.pass(format!(
                "exp: expires {} ({})",
                expires_words(left),
                rfc3339(exp_at)
            ));
        }
        Err(e) => {
            servable = false;
            r.refused("exp", &e);
        }
    }

    let got = claims.audiences();
    match (verifier.audience(), verifier.check_audience(&claims)) {
        (None, _) => r.info(format!(
            "aud: {got:?} (not checked: auth.audience is not set)"
        )),
        (Some(want), Ok(())) => r.pass(format!("aud: includes {want}")),
        (Some(_), Err(e)) => {
            servable = false;
            r.refused("aud", &e);
        }
    }

    let iss = sanitize(claims.str("iss").unwrap_or_default());
    let issuer = endpoints.issuer.as_deref();
    match (issuer, verifier.check_issuer(&claims, issuer)) {
        (None, _) => r.info(format!("iss: {iss} (not checked: no issuer is configured)")),
        (Some(_), Ok(())) => r.pass(format!("iss: {iss}")),
        (Some(_), Err(e)) => {
            servable = false;
            r.refused("iss", &e);
        }
    }

    match verifier.check_client(&claims) {
        Ok(()) => r.pass(format!("client: {}", s.auth.client_id)),
        Err(e) => {
            servable = false;
            r.refused("client", &e);
        }
    }

    let t = &s.token;
    let name = &t.uid_claim;
    match verifier.check_uid(&claims) {
        Ok(()) => {
            let whose = if t.expected_uid == s.auth.client_id {
                "the client id"
            } else {
                "token.expected_uid"
            };
            r.pass(format!("{name}: {} ({whose})", t.expected_uid));
        }
        Err(e) if t.uid_check == UidCheck::Warn => {
            let problem = format!(
                "{} (token.uid_check = \"warn\" serves such tokens anyway)",
                e.problem()
            );
            r.fail(name, problem, e.fix());
        }
        Err(e) => {
            servable = false;
            r.refused(name, &e);
        }
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
            Some(Value::String(v)) => r.pass(format!("{n}: {}", sanitize(v))),
            Some(v) => r.pass(format!("{n}: {}", sanitize(&v.to_string()))),
            None => r.refused(n, &CheckError::ClaimMissing { claim: n.into() }),
        }
    }
    servable
}

/// The daemon answering on the control socket, and the socket's mode.
fn check_daemon(r: &mut Report, s: &Settings, daemon: &Result<Option<Daemon>, ControlError>) {
    let socket = &s.control.socket;
    match daemon {
        Ok(None) => {
            r.info(format!(
                "daemon: not running (nothing answers on {})",
                socket.display()
            ));
            return;
        }
        // Another user's socket, another identity, no answer: the error has the fix.
        Err(e) => r.fail("daemon", e.problem(), e.fix()),
        Ok(Some(d)) => {
            let v = d.status();
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
            } else if let Some(why) = v.pointer("/token/last_error").and_then(Value::as_str) {
                // Its token still serves, but the grant that should replace it failed (a secret
                // rotated wrong): it will stop serving when that token expires.
                r.fail(
                    "daemon's last grant",
                    format!("it failed (the daemon serves its token until it expires): {why}"),
                    "fix the cause above, then `behest-agent refresh`; its log: `journalctl -u behest-agent`",
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
/// With no configuration here, what can be checked of the daemon that answers on the default
/// socket: its token and claims as it reports them, and the upstream through its proxy. The
/// credentials and the IdP need its configuration (and its secret, which it never hands out).
async fn check_daemon_alone(r: &mut Report, daemon: &Daemon) {
    let socket = daemon.path().display();
    let status = daemon.status();
    let d = &status["daemon"];
    r.pass(format!(
        "daemon: pid {}, version {}, on {socket}",
        d["pid"],
        d["version"].as_str().unwrap_or("?")
    ));
    r.info("config: none here; checking the running daemon (--config PATH checks the credentials and the IdP too)");
    let t = &status["token"];
    if t["ready"].as_bool() != Some(true) {
        r.fail(
            "token",
            t["last_error"]
                .as_str()
                .unwrap_or("the daemon holds no valid token"),
            "run `behest-agent doctor --config` with the daemon's configuration to see why",
        );
        return;
    }
    r.pass(format!(
        "token: valid, expires {}",
        expires_words(t["expires_in"].as_i64().unwrap_or(0))
    ));
    let claims = &t["claims"];
    let client = t["client_id"].as_str().unwrap_or_default();
    match claims["uid"].as_str() {
        Some(uid) if uid == client => r.pass(format!("uid: {uid} (the client id)")),
        Some(uid) => r.refused(
            "uid",
            &CheckError::UidMismatch {
                claim: "uid".into(),
                expected: client.into(),
                got: crate::token::claims::shown(uid),
            },
        ),
        None => r.refused(
            "uid",
            &CheckError::UidMissing {
                claim: "uid".into(),
            },
        ),
    }
    for claim in BEHEST_CLAIMS {
        match claims[claim].as_str() {
            Some(v) => r.pass(format!("{claim}: {v}")),
            None => {
                let e = CheckError::ClaimMissing {
                    claim: claim.into(),
                };
                r.info(format!("{claim}: {}; {}", e.problem(), e.fix()));
            }
        }
    }
    let listen = match daemon.proxy_address() {
        Ok(Some(addr)) => addr,
        Ok(None) => return r.info("upstream: the daemon runs no TCP proxy listener"),
        Err(e) => return r.fail("daemon's proxy address", e.problem(), e.fix()),
    };
    let url = format!("http://{listen}/v1/models");
    let what = format!("upstream GET /v1/models through the agent ({listen})");
    let http = match crate::auth::http::client(UPSTREAM_TIMEOUT, None, &Default::default()) {
        Ok(c) => c,
        Err(e) => return r.fail("HTTP client", e, CA_FILE_FIX),
    };
    match http.get(&url).send().await {
        Ok(resp) if resp.status().is_success() => r.pass(format!("{what}: {}", resp.status())),
        Ok(resp) => r.fail(
            what,
            format!("answered {}", resp.status()),
            "see `behest-agent status` and the daemon's log",
        ),
        Err(e) => r.fail(
            what,
            describe_reqwest(&e),
            "see `behest-agent status` and the daemon's log",
        ),
    }
}

/// The disk cache can be written: as the daemon found at its last write, else by a probe file
/// written and removed beside it (the cache itself is left alone).
async fn check_cache(r: &mut Report, s: &Settings, source: &TokenSource, daemon: Option<&Value>) {
    let Some(path) = &s.token.cache_file else {
        r.info("token cache: off (token.cache_file = \"\"): every restart and one-shot call makes a grant");
        return;
    };
    let problem = match daemon.and_then(|v| v.pointer("/token/cache_error")) {
        Some(v) => v.as_str().map(String::from),
        None => source.check_cache().await,
    };
    match problem {
        None => r.pass(format!("token cache: {} can be written", path.display())),
        Some(p) => r.fail(
            "token cache",
            p,
            "make its directory writable by the agent's user and free some disk space, or set token.cache_file to a writable path; until then every restart and one-shot call makes a grant",
        ),
    }
}

/// `[fleet]`: Redis answers and lets the agent take the lock and release it; what the shared
/// entry holds for this client.
async fn check_fleet(r: &mut Report, source: &TokenSource) {
    let Some(fleet) = source.fleet() else {
        r.info("fleet: off (no [fleet] redis_url): this agent makes its own grants");
        return;
    };
    let redis = fleet.status().redis.unwrap_or_default();
    match fleet.probe().await {
        Ok(peek) => {
            r.pass(format!(
                "fleet: Redis at {redis} answers and lets this agent take and release the grant lock"
            ));
            r.info(match peek {
                Peek::Absent => "fleet: no shared token yet (the next grant shares one)",
                Peek::Readable => "fleet: the shared token is sealed under this client's credential",
                Peek::Unreadable => {
                    "fleet: the shared token is sealed under another credential (a rotated secret, or another agent's): the next grant replaces it"
                }
                Peek::Garbage => {
                    "fleet: the shared entry is not a token (something else wrote it): the next grant replaces it"
                }
            });
        }
        Err(e) => r.fail(
            format!("fleet: Redis at {redis}"),
            e,
            "check fleet.redis_url, fleet.redis_username and fleet.redis_password_file, fleet.ca_file for rediss://, and that the ACL user may run GETRANGE, SET, DEL, EVAL and PING on the key_prefix's keys (and SELECT for a database other than 0); meanwhile each agent makes its own grants",
        ),
    }
}

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
    let http = match crate::auth::http::client(
        UPSTREAM_TIMEOUT,
        s.proxy.ca_file.as_deref(),
        &s.proxy.egress,
    ) {
        Ok(c) => c,
        Err(e) => {
            r.fail("upstream HTTPS client", e, CA_FILE_FIX);
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
                format!(
                    "unreachable: {}",
                    s.proxy.egress.through(&url, describe_reqwest(&e))
                ),
                "check proxy.upstream (Behest's base URL) and that this machine reaches it (DNS, firewall, and the egress proxy shown above when one is in use: [egress] or HTTPS_PROXY / NO_PROXY); for an upstream behind a private CA, set proxy.ca_file",
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
