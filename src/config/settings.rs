//! Validated settings: what the rest of the program runs on. Built once from the file model plus the
//! environment (read through a map, never the process environment directly, so tests feed their own)
//! and never changed afterwards; a reload builds a new one. Every error names the key, the file and
//! the fix. Nothing here reads a secret's value into an error or a log line.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey};
use secrecy::SecretString;
use url::Url;

use super::ConfigError;
use super::file::{
    AuthFile, ControlFile, EgressFile, FileConfig, FleetFile, OneOrMany, ProfileFile, ProxyFile,
    TelemetryFile, TokenFile, UsageFile,
};

/// Everything the agent needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The config file these settings came from, when there was one.
    pub path: Option<PathBuf>,
    pub auth: AuthSettings,
    pub token: TokenSettings,
    pub proxy: ProxySettings,
    pub control: ControlSettings,
    pub telemetry: TelemetrySettings,
    pub usage: UsageSettings,
    pub budget: BudgetSettings,
    /// `[fleet]`: the token shared through Redis; `None` without `fleet.redis_url`.
    pub fleet: Option<FleetSettings>,
    /// `[profiles.NAME]`, by name (never `default`: that is `[auth]` itself).
    pub profiles: BTreeMap<String, Profile>,
    /// The profile `auth`, `token` and `proxy.upstream` are: `default`, unless these settings
    /// came from [`Settings::profile`].
    pub profile_name: String,
    /// Things worth telling the operator that do not stop the agent (file permissions, …).
    pub warnings: Vec<String>,
}

/// The name of the profile `[auth]` itself is.
pub const DEFAULT_PROFILE: &str = "default";

/// The longest profile name.
pub const MAX_PROFILE_NAME: usize = 32;

/// A profile name: `[a-z0-9_-]{1,32}`.
pub fn valid_profile(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_PROFILE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// `[profiles.NAME]`: another identity, with its own token engine (and disk cache file) and
/// possibly its own upstream.
#[derive(Debug, Clone)]
pub struct Profile {
    pub auth: AuthSettings,
    /// `[token]`, with this profile's client id as the expected uid and its own cache file.
    pub token: TokenSettings,
    /// Its own `upstream`, else `[proxy]`'s.
    pub upstream: Option<Url>,
}

impl Settings {
    /// The settings the profile `name` runs on: these, with its `[auth]`, token checks, cache file
    /// and upstream. `default` is these settings as they are; an unknown name is `None`.
    pub fn profile(&self, name: &str) -> Option<Settings> {
        if name == DEFAULT_PROFILE {
            return Some(self.clone());
        }
        let p = self.profiles.get(name)?;
        let mut s = self.clone();
        s.auth = p.auth.clone();
        s.token = p.token.clone();
        s.proxy.upstream = p.upstream.clone();
        s.profiles = BTreeMap::new();
        s.profile_name = name.to_string();
        Some(s)
    }
}

/// `proxy.keys_file`: the path (default: the state directory's keys.json; `""` is an error).
pub(super) fn keys_file(
    value: Option<String>,
    origin: Origin<'_>,
) -> Result<Option<PathBuf>, ConfigError> {
    match value {
        Some(s) if s.trim().is_empty() => Err(origin.invalid(
            "proxy.keys_file",
            "must be a path (leave it out for the state directory's keys.json)".to_string(),
        )),
        Some(s) => Ok(Some(PathBuf::from(s))),
        None => Ok(default_state_file(origin.env, "keys.json")),
    }
}

/// `[usage]`: the ledger, and whether streamed chat requests are made to report usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSettings {
    /// `None`: no ledger.
    pub ledger_file: Option<PathBuf>,
    pub ledger_max_size: u64,
    pub stream_include_usage: bool,
}

/// `[budget]`: limits on what sessions and the whole agent may spend; `None` = no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BudgetSettings {
    pub session_tokens: Option<u64>,
    pub session_requests: Option<u64>,
    pub hourly_tokens: Option<u64>,
}

impl BudgetSettings {
    /// No budget at all.
    pub fn is_none(&self) -> bool {
        self.session_tokens.is_none()
            && self.session_requests.is_none()
            && self.hourly_tokens.is_none()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Auth0,
    Oidc,
}

/// Where the token endpoint and JWKS are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoints {
    /// Known without asking (Auth0, or OIDC with explicit URLs).
    Fixed {
        /// The expected `iss` claim, when known.
        issuer: Option<String>,
        token_url: Url,
        jwks_url: Option<Url>,
    },
    /// OIDC discovery at `ISSUER/.well-known/openid-configuration`.
    Discover { issuer: Url },
}

impl Endpoints {
    /// The issuer as configured or derived (used in the cache key and assertions).
    pub fn issuer_hint(&self) -> String {
        match self {
            Endpoints::Fixed {
                issuer, token_url, ..
            } => issuer.clone().unwrap_or_else(|| token_url.to_string()),
            Endpoints::Discover { issuer } => issuer.as_str().to_string(),
        }
    }
}

/// Where the client secret comes from; read again at each grant so rotation needs no restart.
#[derive(Clone)]
pub enum SecretSource {
    /// A file (config `client_secret_file` or the systemd credential); `key` says which.
    File { path: PathBuf, key: &'static str },
    /// An environment variable, captured at start-up.
    Env {
        var: &'static str,
        value: SecretString,
    },
    /// No secret (private_key_jwt).
    None,
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::File { path, key } => write!(f, "File({key}: {})", path.display()),
            SecretSource::Env { var, .. } => write!(f, "Env({var})"),
            SecretSource::None => f.write_str("None"),
        }
    }
}

impl SecretSource {
    /// Where the secret comes from, in words (never the value).
    pub fn describe(&self) -> String {
        match self {
            SecretSource::File { path, key } => format!("{key} ({})", path.display()),
            SecretSource::Env { var, .. } => format!("environment variable {var}"),
            SecretSource::None => "none".to_string(),
        }
    }
}

/// How the agent authenticates to the token endpoint.
#[derive(Debug, Clone)]
pub enum ClientAuth {
    ClientSecretPost,
    ClientSecretBasic,
    PrivateKeyJwt(Arc<AssertionKey>),
}

impl ClientAuth {
    pub fn name(&self) -> &'static str {
        match self {
            ClientAuth::ClientSecretPost => "client_secret_post",
            ClientAuth::ClientSecretBasic => "client_secret_basic",
            ClientAuth::PrivateKeyJwt(_) => "private_key_jwt",
        }
    }
}

/// The private key that signs client assertions (RFC 7523).
pub struct AssertionKey {
    pub key: EncodingKey,
    /// The PEM as read: the credential the fleet's entry key is derived from.
    pub pem: secrecy::SecretSlice<u8>,
    pub alg: Algorithm,
    pub key_id: Option<String>,
    pub path: PathBuf,
}

impl std::fmt::Debug for AssertionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssertionKey")
            .field("alg", &self.alg)
            .field("key_id", &self.key_id)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub provider: Provider,
    pub endpoints: Endpoints,
    pub client_id: String,
    pub secret: SecretSource,
    pub client_auth: ClientAuth,
    pub audience: Option<String>,
    pub resource: Option<String>,
    pub scope: Option<String>,
    pub organization: Option<String>,
    pub extra_params: Vec<(String, String)>,
    /// Bound on one request to the IdP (connect + response).
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UidCheck {
    Enforce,
    Warn,
}

#[derive(Debug, Clone)]
pub struct TokenSettings {
    /// auth.client_id: the client a token's `azp` / `client_id` / Auth0 `sub` must name.
    pub client_id: String,
    pub uid_claim: String,
    pub expected_uid: String,
    pub uid_check: UidCheck,
    pub required_claims: Vec<String>,
    pub verify_signature: bool,
    pub refresh_margin: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// `None`: no disk cache.
    pub cache_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub listen: Vec<ListenAddr>,
    /// The Behest base URL; `None` runs the token engine without a proxy.
    pub upstream: Option<Url>,
    pub ca_file: Option<PathBuf>,
    pub session_id: Option<String>,
    /// `env` and `exec` derive a session from the CI job's variables when none is given.
    pub session_from_ci: bool,
    pub allow_remote: bool,
    pub allowed_origins: Vec<String>,
    /// Every proxied request must present a local key ([`crate::keys`]).
    pub require_key: bool,
    /// Where the hashed local keys are (`None`: no state directory is known).
    pub keys_file: Option<PathBuf>,
    /// Host names the Host guard accepts besides loopback and the connection's own address.
    pub allowed_hosts: Vec<String>,
    pub max_connections: usize,
    /// Concurrent upstream connections (default: `max_connections`).
    pub max_upstream_connections: usize,
    pub max_replay_body: usize,
    /// Bytes of request bodies kept for a replay, all requests together.
    pub replay_budget: usize,
    pub connect_timeout: Duration,
    pub header_read_timeout: Duration,
    pub upstream_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
    /// How the upstream — and the IdP — are reached: `[egress]`, else the environment's proxies.
    pub egress: crate::egress::Egress,
}

#[derive(Debug, Clone)]
pub struct ControlSettings {
    pub socket: PathBuf,
    pub socket_mode: u32,
    /// The mode the socket's directory is created with when missing: 0700 for the user's private
    /// default directory, else 0750 (the group may reach a 0660 socket).
    pub dir_mode: u32,
}

/// `[fleet]`: where the shared token lives and how long its calls may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    /// `redis://HOST:PORT/DB` or `rediss://…`; never with credentials in it.
    pub redis_url: Url,
    /// The ACL user; `None`: the default user.
    pub username: Option<String>,
    /// Holds the password; read again at each connection, so rotating it needs no restart.
    pub password_file: Option<PathBuf>,
    /// The CA that signed a `rediss://` server's certificate, instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    pub key_prefix: String,
    /// How long the lock of a grant in progress holds before another agent may take it.
    pub lock_timeout: Duration,
    /// The bound on each Redis call (connecting included).
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Auto,
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    pub log_level: String,
    pub metrics_listen: Option<SocketAddr>,
}

/// Reads a key as a non-empty string.
fn nonempty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// Where the values being validated came from: the file (for errors) and the environment (for the
/// well-known fallbacks and default directories).
#[derive(Clone, Copy)]
pub(super) struct Origin<'a> {
    pub env: &'a HashMap<String, String>,
    pub path: Option<&'a Path>,
}

impl Origin<'_> {
    fn invalid(&self, key: &str, message: String) -> ConfigError {
        ConfigError::invalid(self.path, key, message)
    }

    fn missing(&self, key: &str, hint: &str) -> ConfigError {
        ConfigError::missing(self.path, key, hint)
    }

    /// A well-known environment variable, when set to something.
    fn var(&self, name: &str) -> Option<String> {
        self.env.get(name).cloned().filter(|s| !s.trim().is_empty())
    }

    /// `key`'s value from the file (or `BEHEST_AGENT__…`, `--set`), else from the well-known
    /// variable `var`; an error in a value `var` gave names `var`.
    fn or_var<T>(
        &self,
        value: Option<String>,
        var: &str,
        check: impl FnOnce(&str) -> Result<T, ConfigError>,
    ) -> Result<Option<T>, ConfigError> {
        match (nonempty(value), self.var(var)) {
            (Some(v), _) => check(&v).map(Some),
            (None, Some(v)) => check(&v).map(Some).map_err(|e| match e {
                ConfigError::Invalid { key, message, .. } => ConfigError::Invalid {
                    file: format!("{}environment variable {var}", super::SET_BY),
                    key,
                    message,
                },
                other => other,
            }),
            (None, None) => Ok(None),
        }
    }
}

/// Builds settings from the merged file model, one section after the other (the first error wins,
/// in this order). `env` is the process environment as a map.
pub(super) fn validate(
    file: FileConfig,
    env: &HashMap<String, String>,
    path: Option<&Path>,
) -> Result<Settings, ConfigError> {
    let origin = Origin { env, path };
    let mut warnings = Vec::new();
    let auth_file = file.auth.clone();
    let allow_insecure = file.proxy.allow_insecure_upstream.unwrap_or(false);
    let auth = auth(file.auth, origin, &mut warnings)?;
    warnings.extend(unused_auth_keys(&auth_file, &auth, "auth"));
    let token = token(file.token, origin, &auth.client_id)?;
    let mut proxy = proxy(file.proxy, origin)?;
    proxy.egress = egress(file.egress, origin, &mut warnings)?;
    let mut profiles = BTreeMap::new();
    for (name, p) in file.profiles {
        let profile = profile(
            &name,
            p,
            &auth_file,
            &token,
            (&proxy, allow_insecure),
            origin,
            &mut warnings,
        )?;
        profiles.insert(name, profile);
    }
    let control = control(file.control, origin, &mut warnings)?;
    let telemetry = telemetry(file.telemetry, origin, proxy.allow_remote)?;
    let usage = usage(file.usage, origin)?;
    let budget = BudgetSettings {
        session_tokens: file.budget.session_tokens.filter(|n| *n > 0),
        session_requests: file.budget.session_requests.filter(|n| *n > 0),
        hourly_tokens: file.budget.hourly_tokens.filter(|n| *n > 0),
    };
    let fleet = fleet(file.fleet, origin, &mut warnings)?;
    if let Some(f) = &fleet
        && f.lock_timeout < auth.timeout
    {
        warnings.push(format!(
            "fleet.lock_timeout ({}) is shorter than auth.timeout ({}): a grant that outlives its lock lets a second agent grant too; raise fleet.lock_timeout above it",
            humantime::format_duration(f.lock_timeout),
            humantime::format_duration(auth.timeout)
        ));
    }
    if let Some(p) = path
        && let Some(w) = permission_warning(p, "config file")
    {
        warnings.push(w);
    }
    Ok(Settings {
        // Absolute, as `status` shows it to a CLI in another directory.
        path: path.map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())),
        auth,
        token,
        proxy,
        control,
        telemetry,
        usage,
        budget,
        fleet,
        profiles,
        profile_name: DEFAULT_PROFILE.to_string(),
        warnings,
    })
}

/// `[profiles.NAME]`: validated like `[auth]` (over `[auth]`'s values), errors naming
/// `profiles.NAME.KEY`. The token checks are `[token]`'s, except that the expected uid is the
/// profile's client id (`token.expected_uid` names the default profile's) and the disk cache is a
/// file of its own (`token-NAME.json` next to `token.json`), so no two profiles share an entry.
fn profile(
    name: &str,
    p: ProfileFile,
    auth_file: &AuthFile,
    token: &TokenSettings,
    (proxy, allow_insecure): (&ProxySettings, bool),
    origin: Origin<'_>,
    warnings: &mut Vec<String>,
) -> Result<Profile, ConfigError> {
    let key = format!("profiles.{name}");
    if !valid_profile(name) {
        return Err(origin.invalid(
            &key,
            format!(
                "`{}` is not a profile name: use 1 to {MAX_PROFILE_NAME} of a-z, 0-9, `_` and `-`",
                name.escape_debug()
            ),
        ));
    }
    if name == DEFAULT_PROFILE {
        return Err(origin.invalid(
            &key,
            "`default` is the profile `[auth]` configures; give this one another name".to_string(),
        ));
    }
    let rename = |e: ConfigError| in_profile(e, name);
    let upstream = match nonempty(p.upstream.clone()) {
        Some(u) => Some(upstream(&u, allow_insecure, origin).map_err(rename)?),
        None => proxy.upstream.clone(),
    };
    let own = p.clone().over(&AuthFile::default());
    let auth = auth(p.over(auth_file), origin, warnings).map_err(rename)?;
    warnings.extend(unused_auth_keys(&own, &auth, &format!("profiles.{name}")));
    let mut token = token.clone();
    token.client_id = auth.client_id.clone();
    token.expected_uid = auth.client_id.clone();
    token.cache_file = token.cache_file.as_deref().map(|f| profile_file(f, name));
    Ok(Profile {
        auth,
        token,
        upstream,
    })
}

/// `dir/token.json` → `dir/token-NAME.json`: a profile's own cache file.
pub fn profile_file(path: &Path, name: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let file = match path.extension() {
        Some(ext) => format!("{stem}-{name}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{name}"),
    };
    path.with_file_name(file)
}

/// An `[auth]` (or `proxy.upstream`) error, renamed for the profile it came from.
fn in_profile(e: ConfigError, name: &str) -> ConfigError {
    let rename = |key: String| match key
        .strip_prefix("auth.")
        .or_else(|| key.strip_prefix("proxy."))
    {
        Some(rest) => format!("profiles.{name}.{rest}"),
        None => key,
    };
    match e {
        ConfigError::Invalid { file, key, message } => ConfigError::Invalid {
            file,
            key: rename(key),
            message,
        },
        ConfigError::Missing { file, key, hint } => ConfigError::Missing {
            file,
            key: rename(key),
            hint,
        },
        other => other,
    }
}

/// `[usage]`: the ledger (default in the state directory; `""`: none) and its size before rotation.
pub(super) fn usage(u: UsageFile, origin: Origin<'_>) -> Result<UsageSettings, ConfigError> {
    let ledger_file = match u.ledger_file {
        Some(s) if s.trim().is_empty() => None,
        Some(s) => Some(PathBuf::from(s)),
        None => default_state_file(origin.env, "usage.jsonl"),
    };
    let ledger_max_size = match nonempty(u.ledger_max_size) {
        None => 64 << 20,
        Some(s) => parse_size(&s).map_err(|m| origin.invalid("usage.ledger_max_size", m))? as u64,
    };
    if ledger_max_size < 4096 {
        return Err(origin.invalid(
            "usage.ledger_max_size",
            "must be at least 4KiB (a few ledger lines)".to_string(),
        ));
    }
    Ok(UsageSettings {
        ledger_file,
        ledger_max_size,
        stream_include_usage: u.stream_include_usage.unwrap_or(false),
    })
}

/// `[auth]`: where the IdP is, who the client is and how it authenticates, what it asks for.
/// Unreadable or world-readable secret files are found here, once, at load.
fn auth(
    a: AuthFile,
    origin: Origin<'_>,
    warnings: &mut Vec<String>,
) -> Result<AuthSettings, ConfigError> {
    let domain_set = nonempty(a.domain.clone()).is_some() || origin.var("AUTH0_DOMAIN").is_some();
    let issuer = nonempty(a.issuer);
    let provider = match nonempty(a.provider).as_deref() {
        Some("auth0") => Provider::Auth0,
        Some("oidc") => Provider::Oidc,
        None if !domain_set && (issuer.is_some() || a.token_url.is_some()) => Provider::Oidc,
        None => Provider::Auth0,
        Some(other) => {
            return Err(origin.invalid(
                "auth.provider",
                format!("`{other}` is not a provider; use \"auth0\" or \"oidc\""),
            ));
        }
    };
    let endpoints = match provider {
        Provider::Auth0 => auth0_endpoints(a.domain, origin)?,
        Provider::Oidc => oidc_endpoints(issuer, a.token_url, a.jwks_url, origin)?,
    };
    let client_id = nonempty(a.client_id)
        .or_else(|| origin.var("AUTH0_CLIENT_ID"))
        .ok_or_else(|| {
            origin.missing(
                "auth.client_id",
                "set it to the machine-to-machine application's Client ID, or set AUTH0_CLIENT_ID",
            )
        })?;
    let audience = nonempty(a.audience).or_else(|| origin.var("AUTH0_AUDIENCE"));
    let resource = nonempty(a.resource);
    if let Some(r) = &resource {
        Url::parse(r).map_err(|_| {
            origin.invalid(
                "auth.resource",
                format!("`{r}` is not an absolute URI (RFC 8707)"),
            )
        })?;
    }
    if provider == Provider::Auth0 && audience.is_none() && resource.is_none() {
        return Err(origin.missing(
            "auth.audience",
            "Auth0 requires the API identifier (e.g. \"https://api.behest.app\"); set it, or AUTH0_AUDIENCE",
        ));
    }
    let client_auth = match nonempty(a.client_auth).as_deref() {
        None | Some("client_secret_post") => ClientAuth::ClientSecretPost,
        Some("client_secret_basic") => ClientAuth::ClientSecretBasic,
        Some("private_key_jwt") => ClientAuth::PrivateKeyJwt(assertion_key(
            a.private_key_file,
            a.signing_alg,
            a.key_id,
            origin,
            warnings,
        )?),
        Some(other) => {
            return Err(origin.invalid(
                "auth.client_auth",
                format!(
                    "`{other}` is not supported; use client_secret_post, client_secret_basic or private_key_jwt"
                ),
            ));
        }
    };
    let secret = match client_auth {
        ClientAuth::PrivateKeyJwt(_) => SecretSource::None,
        _ => client_secret(a.client_secret_file, origin, warnings)?,
    };
    Ok(AuthSettings {
        provider,
        endpoints,
        client_id,
        secret,
        client_auth,
        audience,
        resource,
        scope: nonempty(a.scope),
        organization: nonempty(a.organization),
        extra_params: extra_params(a.extra_params, origin)?,
        timeout: nonzero(a.timeout, Duration::from_secs(30), "auth.timeout", origin)?,
    })
}

/// Keys of `a` (`[auth]`, or a profile's own) set but not used by the provider and client
/// authentication in force: said, not refused (a profile inherits `[auth]`'s and may use them).
fn unused_auth_keys(a: &AuthFile, s: &AuthSettings, section: &str) -> Vec<String> {
    let set = |v: &Option<String>| v.as_deref().is_some_and(|v| !v.trim().is_empty());
    let mut unused = Vec::new();
    let mut note = |key: &str, used_with: &str| {
        unused.push(format!(
            "{section}.{key} is set but not used: it applies only with {used_with}; remove it, or set that if it was meant"
        ))
    };
    match s.provider {
        Provider::Auth0 => {
            for (key, v) in [
                ("issuer", &a.issuer),
                ("token_url", &a.token_url),
                ("jwks_url", &a.jwks_url),
            ] {
                if set(v) {
                    note(
                        key,
                        &format!(
                            "{section}.provider = \"oidc\" (Auth0's endpoints follow from the domain)"
                        ),
                    );
                }
            }
        }
        Provider::Oidc if set(&a.domain) => {
            note("domain", &format!("{section}.provider = \"auth0\""))
        }
        Provider::Oidc => {}
    }
    let jwt = matches!(s.client_auth, ClientAuth::PrivateKeyJwt(_));
    for (key, v) in [
        ("private_key_file", &a.private_key_file),
        ("signing_alg", &a.signing_alg),
        ("key_id", &a.key_id),
    ] {
        if !jwt && set(v) {
            note(key, &format!("{section}.client_auth = \"private_key_jwt\""));
        }
    }
    if jwt && set(&a.client_secret_file) {
        note(
            "client_secret_file",
            &format!("{section}.client_auth = \"client_secret_post\" or \"client_secret_basic\""),
        );
    }
    unused
}

/// Auth0: everything follows from the domain (`auth.domain`, else `AUTH0_DOMAIN`).
fn auth0_endpoints(domain: Option<String>, origin: Origin<'_>) -> Result<Endpoints, ConfigError> {
    let base = origin.or_var(domain, "AUTH0_DOMAIN", |d| {
        base_url(d).map_err(|m| origin.invalid("auth.domain", m))
    })?;
    let base = base.ok_or_else(|| {
        origin.missing(
            "auth.domain",
            "set it to your Auth0 tenant's domain (e.g. \"example.eu.auth0.com\"), or set AUTH0_DOMAIN",
        )
    })?;
    let base_str = base.as_str().trim_end_matches('/').to_string();
    Ok(Endpoints::Fixed {
        issuer: Some(format!("{base_str}/")),
        token_url: join(&base, "oauth/token"),
        jwks_url: Some(join(&base, ".well-known/jwks.json")),
    })
}

/// OIDC: discovery from the issuer, unless both URLs are given.
fn oidc_endpoints(
    issuer: Option<String>,
    token_url: Option<String>,
    jwks_url: Option<String>,
    origin: Origin<'_>,
) -> Result<Endpoints, ConfigError> {
    let token_url = nonempty(token_url)
        .map(|u| parse_url(&u).map_err(|m| origin.invalid("auth.token_url", m)))
        .transpose()?;
    let jwks_url = nonempty(jwks_url)
        .map(|u| parse_url(&u).map_err(|m| origin.invalid("auth.jwks_url", m)))
        .transpose()?;
    match (issuer, token_url) {
        (Some(issuer), token_url) if token_url.is_none() || jwks_url.is_none() => {
            Ok(Endpoints::Discover {
                issuer: parse_url(&issuer).map_err(|m| origin.invalid("auth.issuer", m))?,
            })
        }
        (issuer, Some(token_url)) => Ok(Endpoints::Fixed {
            issuer,
            token_url,
            jwks_url,
        }),
        (_, None) => Err(origin.missing(
            "auth.issuer",
            "provider \"oidc\" needs `issuer` (for discovery) or `token_url` and `jwks_url`",
        )),
    }
}

/// private_key_jwt: the PEM key, read and parsed now so a bad one stops the start.
fn assertion_key(
    private_key_file: Option<String>,
    signing_alg: Option<String>,
    key_id: Option<String>,
    origin: Origin<'_>,
    warnings: &mut Vec<String>,
) -> Result<Arc<AssertionKey>, ConfigError> {
    let key_path = nonempty(private_key_file).ok_or_else(|| {
        origin.missing(
            "auth.private_key_file",
            "client_auth = \"private_key_jwt\" needs the PEM private key registered with the IdP",
        )
    })?;
    let alg_name = nonempty(signing_alg).unwrap_or_else(|| "RS256".to_string());
    let alg = match alg_name.as_str() {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "PS256" => Algorithm::PS256,
        "ES256" => Algorithm::ES256,
        other => {
            return Err(origin.invalid(
                "auth.signing_alg",
                format!("`{other}` is not supported; use RS256, RS384, PS256 or ES256"),
            ));
        }
    };
    let key_path = PathBuf::from(key_path);
    let pem = std::fs::read(&key_path).map_err(|e| {
        origin.invalid(
            "auth.private_key_file",
            format!("cannot read {}: {e}", key_path.display()),
        )
    })?;
    if let Some(w) = permission_warning(&key_path, "auth.private_key_file") {
        warnings.push(w);
    }
    let key = if alg == Algorithm::ES256 {
        EncodingKey::from_ec_pem(&pem)
    } else {
        EncodingKey::from_rsa_pem(&pem)
    }
    .map_err(|_| {
        origin.invalid(
            "auth.private_key_file",
            format!(
                "{} is not a PEM {} private key",
                key_path.display(),
                if alg == Algorithm::ES256 {
                    "EC P-256"
                } else {
                    "RSA"
                }
            ),
        )
    })?;
    Ok(Arc::new(AssertionKey {
        key,
        pem: pem.into(),
        alg,
        key_id: nonempty(key_id),
        path: key_path,
    }))
}

/// Where the client secret comes from; a file must be readable and not empty now (it is read
/// again at each grant).
fn client_secret(
    client_secret_file: Option<String>,
    origin: Origin<'_>,
    warnings: &mut Vec<String>,
) -> Result<SecretSource, ConfigError> {
    let source = secret_source(nonempty(client_secret_file), origin.env).ok_or_else(|| {
        origin.missing(
            "auth.client_secret_file",
            "give the client secret in a file (client_secret_file), as the systemd credential `client-secret`, or in BEHEST_AGENT_CLIENT_SECRET / AUTH0_CLIENT_SECRET",
        )
    })?;
    if let SecretSource::File { path: p, key } = &source {
        read_secret_file(p, key, origin, warnings)?;
    }
    Ok(source)
}

/// Extra token-request parameters, sorted; never one the agent sets itself.
fn extra_params(
    params: BTreeMap<String, String>,
    origin: Origin<'_>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut extra_params: Vec<(String, String)> = params.into_iter().collect();
    for (k, _) in &extra_params {
        if matches!(
            k.as_str(),
            "grant_type"
                | "client_id"
                | "client_secret"
                | "client_assertion"
                | "client_assertion_type"
        ) {
            return Err(origin.invalid(
                "auth.extra_params",
                format!("`{k}` is set by the agent itself and cannot be overridden"),
            ));
        }
    }
    extra_params.sort();
    Ok(extra_params)
}

/// `[token]`: the checks, the refresh schedule and the disk cache. `client_id` is the default
/// expected uid.
fn token(t: TokenFile, origin: Origin<'_>, client_id: &str) -> Result<TokenSettings, ConfigError> {
    let uid_check = match nonempty(t.uid_check).as_deref() {
        None | Some("enforce") => UidCheck::Enforce,
        Some("warn") => UidCheck::Warn,
        Some(other) => {
            return Err(origin.invalid(
                "token.uid_check",
                format!("`{other}` is not a mode; use \"enforce\" or \"warn\""),
            ));
        }
    };
    let min_backoff = t.min_backoff.unwrap_or(Duration::from_secs(1));
    let max_backoff = t.max_backoff.unwrap_or(Duration::from_secs(300));
    if min_backoff.is_zero() || max_backoff < min_backoff {
        // The key that was set wrong: a max_backoff left at its default is not it.
        let key = if min_backoff.is_zero() || t.max_backoff.is_none() {
            "token.min_backoff"
        } else {
            "token.max_backoff"
        };
        return Err(origin.invalid(
            key,
            format!(
                "needs 0 < min_backoff <= max_backoff (min_backoff {}, max_backoff {})",
                humantime::format_duration(min_backoff),
                humantime::format_duration(max_backoff)
            ),
        ));
    }
    let cache_file = match t.cache_file {
        Some(s) if s.trim().is_empty() => None,
        Some(s) => Some(PathBuf::from(s)),
        None => default_cache_file(origin.env),
    };
    Ok(TokenSettings {
        uid_claim: nonempty(t.uid_claim).unwrap_or_else(|| "uid".to_string()),
        client_id: client_id.to_string(),
        expected_uid: nonempty(t.expected_uid).unwrap_or_else(|| client_id.to_string()),
        uid_check,
        required_claims: t.required_claims.map_or_else(
            || vec!["tid".to_string(), "pid".to_string()],
            OneOrMany::into_vec,
        ),
        verify_signature: t.verify_signature.unwrap_or(true),
        refresh_margin: t.refresh_margin.unwrap_or(Duration::from_secs(300)),
        min_backoff,
        max_backoff,
        cache_file,
    })
}

/// `[proxy]`: where it listens, where it forwards, and its limits.
/// `[egress]`, else the proxies of the environment as curl reads them (`https_proxy` /
/// `HTTPS_PROXY`, `http_proxy` — curl ignores `HTTP_PROXY` —, `all_proxy` / `ALL_PROXY`, `no_proxy`
/// / `NO_PROXY`). Only `http://` proxies; a password only from `proxy_password_file` in `[egress]`.
/// With proxies from the environment and no `NO_PROXY`, loopback destinations go direct.
fn egress(
    e: EgressFile,
    origin: Origin<'_>,
    warnings: &mut Vec<String>,
) -> Result<crate::egress::Egress, ConfigError> {
    use secrecy::SecretString;
    let http_url = |raw: &str, key: &str| -> Result<Url, ConfigError> {
        let with_scheme = if raw.contains("://") {
            raw.to_string()
        } else {
            format!("http://{raw}")
        };
        let url = Url::parse(&with_scheme).map_err(|err| {
            origin.invalid(
                key,
                format!(
                    "`{}` is not a proxy URL: {err}",
                    crate::egress::without_credentials(&with_scheme)
                ),
            )
        })?;
        if url.scheme() != "http" || url.host_str().is_none() {
            return Err(origin.invalid(
                key,
                format!(
                    "only an http:// proxy (http://HOST:PORT) is supported, not `{}`; the agent tunnels to https destinations with CONNECT",
                    crate::egress::without_credentials(&with_scheme)
                ),
            ));
        }
        Ok(url)
    };
    if let Some(raw) = nonempty(e.proxy) {
        let mut url = http_url(&raw, "egress.proxy")?;
        if url.password().is_some() {
            return Err(origin.invalid(
                "egress.proxy",
                "holds a password: put it in egress.proxy_password_file (mode 0600) and keep only the user name in the URL".to_string(),
            ));
        }
        if let Some(file) = nonempty(e.proxy_password_file) {
            let key = "egress.proxy_password_file";
            if url.username().is_empty() {
                return Err(origin.invalid(
                    key,
                    "needs a user name in egress.proxy (http://USER@HOST:PORT) to go with it"
                        .to_string(),
                ));
            }
            let password = read_secret_file(Path::new(&file), key, origin, warnings)?;
            let _ = url.set_password(Some(&password));
        }
        let proxy = SecretString::from(url.to_string());
        return Ok(bypassing(crate::egress::Egress {
            http: Some(proxy.clone()),
            https: Some(proxy),
            no_proxy: e.no_proxy.unwrap_or_else(|| LOOPBACK.to_string()),
            source: "egress.proxy".into(),
        }));
    }
    if e.proxy_password_file.is_some() {
        return Err(origin.invalid(
            "egress.proxy_password_file",
            "is set but egress.proxy is not".to_string(),
        ));
    }
    let from = |names: &[&'static str]| names.iter().find_map(|n| origin.var(n).map(|v| (*n, v)));
    let https = from(&["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]);
    let http = from(&["http_proxy", "all_proxy", "ALL_PROXY"]);
    let check = |found: Option<(&'static str, String)>| -> Result<_, ConfigError> {
        found
            .map(|(name, raw)| {
                http_url(&raw, name)?;
                Ok((name, SecretString::from(raw)))
            })
            .transpose()
    };
    let (https, http) = (check(https)?, check(http)?);
    let names: Vec<&str> = https.iter().chain(&http).map(|(n, _)| *n).collect();
    let mut source = names.join(", ");
    if names.len() == 2 && names[0] == names[1] {
        source = names[0].to_string();
    }
    let no_proxy = e
        .no_proxy
        .or_else(|| origin.var("no_proxy"))
        .or_else(|| origin.var("NO_PROXY"))
        .unwrap_or_else(|| LOOPBACK.to_string());
    Ok(bypassing(crate::egress::Egress {
        http: http.map(|(_, p)| p),
        https: https.map(|(_, p)| p),
        no_proxy,
        source,
    }))
}

/// What is reached directly when no `no_proxy` / `NO_PROXY` says otherwise: no proxy can reach
/// this machine's loopback (and an `http` IdP there would hand the proxy the client secret).
const LOOPBACK: &str = "localhost, 127.0.0.0/8, ::1";

/// `e` without any proxy when its `no_proxy` holds `*`, which curl reads as every host, IP
/// addresses too (hyper-util's matcher would apply it to names only).
fn bypassing(mut e: crate::egress::Egress) -> crate::egress::Egress {
    if e.no_proxy.split(',').any(|h| h.trim() == "*") {
        e.http = None;
        e.https = None;
    }
    e
}

fn proxy(p: ProxyFile, origin: Origin<'_>) -> Result<ProxySettings, ConfigError> {
    let allow_remote = p.allow_remote.unwrap_or(false);
    let require_key = p.require_key.unwrap_or(false);
    let listen = listen(p.listen, allow_remote, origin)?;
    // A remote client is a stranger unless it shows a key: both switches are needed.
    if let Some(sa) = listen.iter().find_map(|l| match l {
        ListenAddr::Tcp(sa) if !sa.ip().is_loopback() => Some(sa),
        _ => None,
    }) && !require_key
    {
        return Err(origin.invalid(
            "proxy.listen",
            format!(
                "{sa} is not a loopback address: anyone who can reach it could use this machine's credential. A non-loopback listen needs both proxy.allow_remote = true and proxy.require_key = true (clients then present a key from `behest-agent key create`)"
            ),
        ));
    }
    let keys_file = keys_file(p.keys_file, origin)?;
    if require_key && keys_file.is_none() {
        return Err(origin.missing(
            "proxy.keys_file",
            "proxy.require_key needs a keys file: set proxy.keys_file, or STATE_DIRECTORY / XDG_STATE_HOME / HOME",
        ));
    }
    let allowed_hosts = p.allowed_hosts.map(OneOrMany::into_vec).unwrap_or_default();
    if let Some(h) = allowed_hosts.iter().find(|h| {
        h.is_empty()
            || !h
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    }) {
        return Err(origin.invalid(
            "proxy.allowed_hosts",
            format!(
                "`{}` is not a host name (letters, digits, '.' and '-'; no port)",
                h.escape_debug()
            ),
        ));
    }
    let allow_insecure = p.allow_insecure_upstream.unwrap_or(false);
    let upstream = origin.or_var(p.upstream, "BEHEST_BASE_URL", |u| {
        upstream(u, allow_insecure, origin)
    })?;
    let max_replay_body = match nonempty(p.max_replay_body) {
        None => 1 << 20,
        Some(s) => parse_size(&s).map_err(|m| origin.invalid("proxy.max_replay_body", m))?,
    };
    let replay_budget = match nonempty(p.replay_budget) {
        None => 64 << 20,
        Some(s) => parse_size(&s).map_err(|m| origin.invalid("proxy.replay_budget", m))?,
    };
    let at_least_one = |n: Option<usize>, key: &str| match n {
        Some(0) => Err(origin.invalid(key, "0 would serve nothing: use 1 or more".to_string())),
        n => Ok(n),
    };
    let max_connections = at_least_one(p.max_connections, "proxy.max_connections")?.unwrap_or(4096);
    let max_upstream_connections =
        at_least_one(p.max_upstream_connections, "proxy.max_upstream_connections")?
            .unwrap_or(max_connections);
    let session_id = nonempty(p.session_id);
    if let Some(s) = &session_id
        && !crate::proxy::valid_session(s.as_bytes())
    {
        return Err(origin.invalid(
            "proxy.session_id",
            "use 1 to 128 visible ASCII characters (no spaces)".to_string(),
        ));
    }
    let proxy = ProxySettings {
        listen,
        upstream,
        ca_file: nonempty(p.ca_file).map(PathBuf::from),
        session_id,
        session_from_ci: p.session_from_ci.unwrap_or(true),
        egress: Default::default(),
        allow_remote,
        allowed_origins: p
            .allowed_origins
            .map(OneOrMany::into_vec)
            .unwrap_or_default(),
        require_key,
        keys_file,
        allowed_hosts,
        max_connections,
        max_upstream_connections,
        max_replay_body,
        replay_budget,
        connect_timeout: nonzero(
            p.connect_timeout,
            Duration::from_secs(10),
            "proxy.connect_timeout",
            origin,
        )?,
        header_read_timeout: nonzero(
            p.header_read_timeout,
            Duration::from_secs(30),
            "proxy.header_read_timeout",
            origin,
        )?,
        upstream_timeout: nonzero(
            p.upstream_timeout,
            Duration::from_secs(600),
            "proxy.upstream_timeout",
            origin,
        )?,
        idle_timeout: nonzero(
            p.idle_timeout,
            Duration::from_secs(300),
            "proxy.idle_timeout",
            origin,
        )?,
        shutdown_grace: p.shutdown_grace.unwrap_or(Duration::from_secs(30)),
    };
    if let Some(ca) = &proxy.ca_file
        && !ca.is_file()
    {
        return Err(origin.invalid(
            "proxy.ca_file",
            format!("{} does not exist or is not a file", ca.display()),
        ));
    }
    Ok(proxy)
}

/// A timeout (default `default`): zero would wait for nothing or turn its guard off, so it is
/// refused rather than read as "off".
fn nonzero(
    value: Option<Duration>,
    default: Duration,
    key: &str,
    origin: Origin<'_>,
) -> Result<Duration, ConfigError> {
    match value {
        Some(d) if d.is_zero() => Err(origin.invalid(
            key,
            format!(
                "0 is not a usable timeout (nothing could finish, or the guard would be off); the default is {}",
                humantime::format_duration(default)
            ),
        )),
        Some(d) => Ok(d),
        None => Ok(default),
    }
}

/// `proxy.listen` (default `127.0.0.1:8711`): loopback only unless `allow_remote`; at least one
/// address, each once.
pub(super) fn listen(
    listen: Option<OneOrMany>,
    allow_remote: bool,
    origin: Origin<'_>,
) -> Result<Vec<ListenAddr>, ConfigError> {
    let listen_strs = listen
        .map(|l| l.into_vec())
        .unwrap_or_else(|| vec!["127.0.0.1:8711".to_string()]);
    let mut out = Vec::new();
    for s in listen_strs {
        let addr = parse_listen(&s).map_err(|m| origin.invalid("proxy.listen", m))?;
        if let ListenAddr::Tcp(sa) = &addr
            && !sa.ip().is_loopback()
            && !allow_remote
        {
            return Err(origin.invalid(
                "proxy.listen",
                format!(
                    "{sa} is not a loopback address: the proxy injects this machine's credential, so anyone who can reach it can use it. Listen on 127.0.0.1, or set proxy.allow_remote = true and proxy.require_key = true if that is really intended"
                ),
            ));
        }
        if out.contains(&addr) {
            return Err(origin.invalid(
                "proxy.listen",
                format!("{addr} is listed twice; list each address once"),
            ));
        }
        out.push(addr);
    }
    if out.is_empty() {
        return Err(origin.invalid(
            "proxy.listen",
            "is empty, so the proxy would serve nowhere; give an address such as \"127.0.0.1:8711\" (or leave the key out for that default)".to_string(),
        ));
    }
    Ok(out)
}

/// `proxy.upstream`: an https base URL (http only when allowed), nothing after the path.
fn upstream(u: &str, allow_insecure: bool, origin: Origin<'_>) -> Result<Url, ConfigError> {
    let url = parse_url(u).map_err(|m| origin.invalid("proxy.upstream", m))?;
    if url.scheme() != "https" && !allow_insecure {
        return Err(origin.invalid(
            "proxy.upstream",
            format!(
                "`{url}` is not https: the token would cross the network in clear. Use https, or set proxy.allow_insecure_upstream = true (for a local test server)"
            ),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(origin.invalid(
            "proxy.upstream",
            "must be a base URL without query, fragment or credentials".to_string(),
        ));
    }
    Ok(url)
}

/// `[control]`: the control socket and its mode; a mode wider than 0660 is warned about.
fn control(
    c: ControlFile,
    origin: Origin<'_>,
    warnings: &mut Vec<String>,
) -> Result<ControlSettings, ConfigError> {
    let socket = nonempty(c.socket)
        .map(PathBuf::from)
        .unwrap_or_else(|| default_socket(origin.env));
    let socket_mode = match nonempty(c.socket_mode) {
        None => 0o660,
        Some(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                origin.invalid(
                    "control.socket_mode",
                    format!("`{s}` is not an octal mode like \"0660\""),
                )
            })?,
    };
    if socket_mode & !0o660 != 0 {
        warnings.push(format!(
            "control.socket_mode {socket_mode:04o} is wider than 0660: users outside the socket's owner and group can connect and take the token; use \"0660\" (or \"0600\")"
        ));
    }
    let dir_mode = if Some(&socket) == private_socket(origin.env).as_ref() {
        0o700
    } else {
        0o750
    };
    Ok(ControlSettings {
        socket,
        socket_mode,
        dir_mode,
    })
}

/// `[telemetry]`: logs and metrics. A non-loopback metrics address needs `proxy.allow_remote`.
fn telemetry(
    tl: TelemetryFile,
    origin: Origin<'_>,
    allow_remote: bool,
) -> Result<TelemetrySettings, ConfigError> {
    let log_format = match nonempty(tl.log_format).as_deref() {
        None | Some("auto") => LogFormat::Auto,
        Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            return Err(origin.invalid(
                "telemetry.log_format",
                format!("`{other}` is not a format; use auto, text or json"),
            ));
        }
    };
    let log_level = nonempty(tl.log_level).unwrap_or_else(|| "info".to_string());
    if let Err(e) = super::check_log_filter(&log_level) {
        return Err(origin.invalid("telemetry.log_level", e));
    }
    let metrics_listen = nonempty(tl.metrics_listen)
        .map(|s| {
            s.parse::<SocketAddr>().map_err(|_| {
                origin.invalid(
                    "telemetry.metrics_listen",
                    format!("`{s}` is not an IP:port"),
                )
            })
        })
        .transpose()?;
    if let Some(m) = metrics_listen
        && !m.ip().is_loopback()
        && !allow_remote
    {
        return Err(origin.invalid(
            "telemetry.metrics_listen",
            format!(
                "{m} is not a loopback address; set proxy.allow_remote = true to expose metrics"
            ),
        ));
    }
    Ok(TelemetrySettings {
        log_format,
        log_level,
        metrics_listen,
    })
}

/// `[fleet]`: on with `redis_url`; its other keys without it are an error (a typo in the URL's
/// key must not silently leave the fleet off).
fn fleet(
    f: FleetFile,
    origin: Origin<'_>,
    warnings: &mut Vec<String>,
) -> Result<Option<FleetSettings>, ConfigError> {
    let set_empty = f.redis_url.is_some();
    let Some(url) = nonempty(f.redis_url) else {
        if set_empty {
            // An unset CI variable (`redis_url = "$REDIS_URL"`) would otherwise leave it off unsaid.
            warnings.push(
                "fleet.redis_url is set but empty: the fleet is off, and this agent makes its own grants"
                    .to_string(),
            );
        }
        let others = [
            ("fleet.redis_username", f.redis_username.is_some()),
            ("fleet.redis_password_file", f.redis_password_file.is_some()),
            ("fleet.ca_file", f.ca_file.is_some()),
            ("fleet.key_prefix", f.key_prefix.is_some()),
            ("fleet.lock_timeout", f.lock_timeout.is_some()),
            ("fleet.timeout", f.timeout.is_some()),
        ];
        if let Some((key, _)) = others.iter().find(|(_, set)| *set) {
            return Err(origin.missing(
                "fleet.redis_url",
                &format!(
                    "{key} is set, but the fleet is on only with redis_url (e.g. \"redis://10.0.0.5:6379/0\"); set it, or remove the [fleet] keys"
                ),
            ));
        }
        return Ok(None);
    };
    let redis_url = redis_url(&url).map_err(|m| origin.invalid("fleet.redis_url", m))?;
    let password_file = nonempty(f.redis_password_file).map(PathBuf::from);
    if let Some(p) = &password_file {
        read_secret_file(p, "fleet.redis_password_file", origin, warnings)?;
        if redis_url.scheme() == "redis" && !is_loopback_host(&redis_url) {
            warnings.push(format!(
                "fleet.redis_url {redis_url} is plain redis:// to another host: the Redis password crosses the network in clear (the token entry is sealed either way); use rediss://"
            ));
        }
    }
    let ca_file = nonempty(f.ca_file).map(PathBuf::from);
    if let Some(ca) = &ca_file {
        if redis_url.scheme() != "rediss" {
            return Err(origin.invalid(
                "fleet.ca_file",
                format!(
                    "is only used with TLS, and fleet.redis_url {redis_url} is plain redis://; use rediss://, or remove ca_file"
                ),
            ));
        }
        if !ca.is_file() {
            return Err(origin.invalid(
                "fleet.ca_file",
                format!("{} does not exist or is not a file", ca.display()),
            ));
        }
    }
    let key_prefix = f.key_prefix.unwrap_or_else(|| "behest-agent:".to_string());
    if key_prefix.len() > 256 || key_prefix.chars().any(|c| c.is_control() || c == ' ') {
        return Err(origin.invalid(
            "fleet.key_prefix",
            "must be at most 256 characters, without spaces or control characters (e.g. \"behest-agent:\")".to_string(),
        ));
    }
    Ok(Some(FleetSettings {
        redis_url,
        username: nonempty(f.redis_username),
        password_file,
        ca_file,
        key_prefix,
        lock_timeout: nonzero(
            f.lock_timeout,
            Duration::from_secs(30),
            "fleet.lock_timeout",
            origin,
        )?,
        timeout: nonzero(f.timeout, Duration::from_secs(2), "fleet.timeout", origin)?,
    }))
}

/// `redis://HOST[:PORT][/DB]` or `rediss://…`, with no credentials, query or fragment. A message
/// never quotes the user's text, which may carry a password (`:pw@`, `?password=`): only the
/// scheme, host, port and path.
fn redis_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("is not a URL ({e})"))?;
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    let shown = format!(
        "{}://{}{port}{}",
        url.scheme(),
        url.host_str().unwrap_or_default(),
        url.path()
    );
    if !matches!(url.scheme(), "redis" | "rediss") {
        return Err(format!(
            "`{shown}`: scheme `{}` is not redis:// or rediss:// (TLS)",
            url.scheme()
        ));
    }
    if url.password().is_some() {
        return Err(
            "has a password in it; put the password in a file (mode 0600) and name it in fleet.redis_password_file"
                .to_string(),
        );
    }
    if !url.username().is_empty() {
        return Err(format!(
            "`{shown}` has a user name in it; set fleet.redis_username instead"
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("`{shown}` names no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "`{shown}` has a query or fragment; remove it (a password goes in fleet.redis_password_file, the database in the path, e.g. /0)"
        ));
    }
    let db = url.path().trim_start_matches('/');
    if !db.is_empty() && db.parse::<u16>().is_err() {
        return Err(format!(
            "`{shown}`: the path is the database number (e.g. /0), not `{}`",
            url.path()
        ));
    }
    Ok(url)
}

/// The secret in a secret file's text, without a leading byte-order mark and surrounding
/// whitespace (an editor's or `echo`'s newline, a stray space or tab). A second line or a control
/// character (a NUL, say) is refused: no IdP would accept it, and which part is the secret cannot
/// be guessed. The message never quotes the text.
pub fn secret_text(text: &str) -> Result<&str, &'static str> {
    let secret = text.strip_prefix('\u{feff}').unwrap_or(text).trim();
    if secret.is_empty() {
        Err("the file is empty (or holds only whitespace)")
    } else if secret.contains(['\n', '\r']) {
        Err("the file holds more than one line; keep only the secret, on one line")
    } else if secret.chars().any(char::is_control) {
        Err("the secret holds a control character (a NUL or a tab, say); keep only the secret")
    } else {
        Ok(secret)
    }
}

fn secret_source(file: Option<String>, env: &HashMap<String, String>) -> Option<SecretSource> {
    if let Some(f) = file {
        return Some(SecretSource::File {
            path: PathBuf::from(f),
            key: "auth.client_secret_file",
        });
    }
    if let Some(dir) = env.get("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty()) {
        let p = Path::new(dir).join("client-secret");
        if p.exists() {
            return Some(SecretSource::File {
                path: p,
                key: "systemd credential client-secret",
            });
        }
    }
    for var in ["BEHEST_AGENT_CLIENT_SECRET", "AUTH0_CLIENT_SECRET"] {
        if let Some(v) = env.get(var).filter(|v| !v.trim().is_empty()) {
            return Some(SecretSource::Env {
                var,
                value: SecretString::from(v.trim().to_string()),
            });
        }
    }
    None
}

/// The one line of the secret file `path` (the value of `key`): a file this user may not read
/// says whom to run as; one other users may read is warned about.
fn read_secret_file(
    path: &Path,
    key: &str,
    origin: Origin<'_>,
    warnings: &mut Vec<String>,
) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let why = if e.kind() == std::io::ErrorKind::PermissionDenied {
            format!(
                "{e}: this user (uid {}) may not read it; run the command as the user the agent runs as (e.g. `sudo -u behest-agent`), or let this user read it",
                nix::unistd::getuid()
            )
        } else {
            e.to_string()
        };
        origin.invalid(key, format!("cannot read {}: {why}", path.display()))
    })?;
    let secret = secret_text(&text)
        .map_err(|e| origin.invalid(key, format!("{}: {e}", path.display())))?
        .to_string();
    if let Some(w) = permission_warning(path, key) {
        warnings.push(w);
    }
    Ok(secret)
}

/// A warning when a file holding configuration or a secret can be read by other users.
fn permission_warning(path: &Path, what: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    // A secret should be readable by its owner only; a config file by its group too.
    let fix = if what == "config file" { "o-r" } else { "600" };
    (mode & 0o004 != 0).then(|| {
        format!(
            "{what} {} is readable by every user (mode {:04o}); run `chmod {fix} {}`",
            path.display(),
            mode & 0o7777,
            path.display()
        )
    })
}

/// `example.auth0.com` → `https://example.auth0.com/`; a full URL is accepted as is (http only on
/// loopback).
fn base_url(domain: &str) -> Result<Url, String> {
    let with_scheme = if domain.contains("://") {
        domain.to_string()
    } else {
        format!("https://{domain}")
    };
    let mut url = parse_url(&with_scheme)?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "`{domain}` has a query or fragment: give the tenant's domain (e.g. example.eu.auth0.com)"
        ));
    }
    // `https://tenant/oauth/token` would be asked at `/oauth/token/oauth/token`.
    if !url.path().trim_end_matches('/').is_empty() {
        return Err(format!(
            "`{domain}` has a path ({}): give the tenant's domain alone (e.g. example.eu.auth0.com); the agent adds /oauth/token and the JWKS path itself",
            url.path()
        ));
    }
    url.set_path("/");
    Ok(url)
}

fn join(base: &Url, rel: &str) -> Url {
    base.join(rel)
        .expect("a relative path joins onto a base URL")
}

/// An absolute http(s) URL without a user or password; plain http only to a loopback host.
pub fn parse_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("`{s}` is not a URL ({e})"))?;
    if !url.username().is_empty() || url.password().is_some() {
        // Not echoed: the password would be in the error.
        return Err(format!(
            "the URL of {} holds a user or password, which would be sent and logged with it: remove them (the client's own credentials are auth.client_id and its secret)",
            url.host_str().unwrap_or("no host")
        ));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback_host(&url) => Ok(url),
        "http" => Err(format!(
            "`{s}` uses plain http to a non-loopback host; use https"
        )),
        other => Err(format!("`{s}`: scheme `{other}` is not http(s)")),
    }
}

pub fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        // A URL of a scheme the URL standard does not know (`redis://`) keeps an IPv4 address as a
        // name.
        Some(url::Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost")
                || d.parse::<std::net::Ipv4Addr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    if let Some(p) = s.strip_prefix("unix:") {
        if p.is_empty() {
            return Err("`unix:` needs a path, like \"unix:/run/behest-agent/proxy.sock\"".into());
        }
        return Ok(ListenAddr::Unix(PathBuf::from(p)));
    }
    if let Some(port) = s.strip_prefix("localhost:") {
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("`{s}` has no valid port"))?;
        return Ok(ListenAddr::Tcp(SocketAddr::new(
            IpAddr::from([127, 0, 0, 1]),
            port,
        )));
    }
    s.parse::<SocketAddr>()
        .map(ListenAddr::Tcp)
        .map_err(|_| format!("`{s}` is not IP:PORT or unix:/path"))
}

/// `1MiB`, `512KiB`, `1048576`, `2MB`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like \"1MiB\""))?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "KB" | "kB" => 1000,
        "MiB" | "M" => 1 << 20,
        "MB" => 1_000_000,
        "GiB" | "G" => 1 << 30,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "`{other}` is not a size unit (use B, KiB, MiB, GiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

fn default_cache_file(env: &HashMap<String, String>) -> Option<PathBuf> {
    default_state_file(env, "token.json")
}

/// `name` in the state directory: `$STATE_DIRECTORY` (systemd), else `$XDG_STATE_HOME/behest-agent`,
/// else `~/.local/state/behest-agent`.
fn default_state_file(env: &HashMap<String, String>, name: &str) -> Option<PathBuf> {
    let first = |k: &str| {
        env.get(k)
            .and_then(|v| v.split(':').next().map(str::to_string))
            .filter(|v| !v.is_empty())
    };
    if let Some(d) = first("STATE_DIRECTORY") {
        return Some(Path::new(&d).join(name));
    }
    if let Some(d) = first("XDG_STATE_HOME") {
        return Some(Path::new(&d).join("behest-agent").join(name));
    }
    first("HOME").map(|h| Path::new(&h).join(".local/state/behest-agent").join(name))
}

/// The control socket when none is configured: `$RUNTIME_DIRECTORY/agent.sock` (systemd),
/// `$XDG_RUNTIME_DIR/behest-agent.sock`, else [`private_socket`] (never a directory every user may
/// write, such as `/tmp`: another user could create the socket there first).
pub fn default_socket(env: &HashMap<String, String>) -> PathBuf {
    let first = |k: &str| {
        env.get(k)
            .and_then(|v| v.split(':').next().map(str::to_string))
            .filter(|v| !v.is_empty())
    };
    if let Some(d) = first("RUNTIME_DIRECTORY") {
        return Path::new(&d).join("agent.sock");
    }
    if let Some(d) = first("XDG_RUNTIME_DIR") {
        return Path::new(&d).join("behest-agent.sock");
    }
    private_socket(env).unwrap_or_else(|| {
        PathBuf::from(format!(
            "/run/user/{}/behest-agent.sock",
            nix::unistd::geteuid()
        ))
    })
}

/// `agent.sock` in the user's private directory, the one the disk cache defaults to:
/// `$XDG_STATE_HOME/behest-agent`, else `~/.local/state/behest-agent` (created 0700). `None` when
/// the user has no home directory.
pub fn private_socket(env: &HashMap<String, String>) -> Option<PathBuf> {
    let absolute = |k: &str| env.get(k).map(PathBuf::from).filter(|p| p.is_absolute());
    let state = absolute("XDG_STATE_HOME").or_else(|| {
        absolute("HOME")
            .or_else(|| {
                nix::unistd::User::from_uid(nix::unistd::geteuid())
                    .ok()
                    .flatten()
                    .map(|u| u.dir)
                    .filter(|d| d.is_absolute())
            })
            .map(|h| h.join(".local/state"))
    })?;
    Some(state.join("behest-agent/agent.sock"))
}
