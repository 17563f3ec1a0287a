//! The control API server.

use std::convert::Infallible;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::keys::{KeyStore, KeysError, NewKey};
use crate::server::Listener;
use crate::token::{TokenError, TokenSource, rfc3339};

/// Every profile's token source, by name, `default` first.
pub type AllProfiles = Arc<dyn Fn() -> Vec<(String, TokenSource)> + Send + Sync>;

/// What the control API serves from. Closures, so a reload's new token source is picked up.
#[derive(Clone)]
pub struct ControlState {
    /// The current token source (the profile `default`).
    pub tokens: Arc<dyn Fn() -> TokenSource + Send + Sync>,
    /// Every profile's token source, by name, `default` first (`None`: only `default`).
    pub profiles: Option<AllProfiles>,
    /// Facts about the daemon (pid, version, proxy addresses) merged into `/v1/status`.
    pub daemon: Arc<dyn Fn() -> Value + Send + Sync>,
    /// Live figures (proxy counters) merged into `/v1/status` under `proxy`.
    pub live: Option<Arc<dyn Fn() -> Value + Send + Sync>>,
    /// The usage counts served at `/v1/usage`.
    pub usage: Option<Arc<crate::usage::Accounting>>,
    /// The local keys managed at `/v1/keys` (the daemon owns the keys file).
    pub keys: Option<Arc<KeyStore>>,
    /// The daemon's own stop: `POST /v1/shutdown` cancels it, as SIGTERM does.
    pub shutdown: CancellationToken,
}

/// Binds the control socket with `mode` (see [`crate::server::bind_unix`]), creating its directory
/// with `dir_mode` when it is missing. Warns when the socket's group is not the daemon user's own:
/// every member of that group could then take the token.
pub async fn bind(path: &Path, mode: u32, dir_mode: u32) -> std::io::Result<Listener> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(dir_mode)
            .create(dir)?;
    }
    let listener = crate::server::bind_unix(path, mode).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            std::io::Error::new(
                e.kind(),
                format!(
                    "another process answers on {} (another behest-agent daemon?); stop it or set control.socket",
                    path.display()
                ),
            )
        } else {
            e
        }
    })?;
    if let Some(w) = shared_group_warning(path, mode) {
        tracing::warn!("{w}");
    }
    Ok(listener)
}

/// A warning when `mode` lets the socket's group connect, its directory lets that group in, and
/// the group is not the daemon user's own (a primary group like `users` that others share).
fn shared_group_warning(path: &Path, mode: u32) -> Option<String> {
    use nix::unistd::{Gid, Group, Uid, User};
    use std::os::unix::fs::MetadataExt;
    let socket = std::fs::metadata(path).ok()?;
    let dir = std::fs::metadata(path.parent()?).ok()?;
    if mode & 0o060 == 0 || dir.mode() & 0o010 == 0 {
        return None;
    }
    let group = Group::from_gid(Gid::from_raw(socket.gid())).ok()??;
    let user = User::from_uid(Uid::effective()).ok()??;
    (group.name != user.name).then(|| {
        format!(
            "the control socket {} belongs to group `{}`, which is not `{}`'s own group: every member of `{}` can connect and take the token. Run the daemon with a group of its own (the service's `behest-agent`), or set control.socket_mode = \"0600\"",
            path.display(),
            group.name,
            user.name,
            group.name
        )
    })
}

/// Serves the control API until `shutdown`.
pub async fn serve(listener: Listener, state: ControlState, shutdown: CancellationToken) {
    let make = move |_| {
        let state = state.clone();
        hyper::service::service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handle(&state, req).await) }
        })
    };
    crate::server::serve(vec![listener], crate::server::Limits::LOCAL, make, shutdown).await
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a static response builds")
}

fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        &json!({"error": {"code": code, "message": message}}),
    )
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A query value with its `%XX` escapes decoded (a session may hold characters a query cannot).
fn percent_decoded(s: &str) -> String {
    url::form_urlencoded::parse(format!("v={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// `60`, `60s`, `5m`.
pub fn parse_ttl(s: &str) -> Option<Duration> {
    s.parse::<u64>()
        .map(Duration::from_secs)
        .ok()
        .or_else(|| humantime::parse_duration(s).ok())
}

/// The full status document: `token` is the default profile's; `profiles` has every profile's
/// (`default` too) under its name.
pub fn status_json(state: &ControlState) -> Value {
    let default = (state.tokens)();
    let profiles: serde_json::Map<String, Value> = match &state.profiles {
        Some(all) => all()
            .into_iter()
            .map(|(name, t)| (name, json!({ "token": t.status() })))
            .collect(),
        None => [(
            crate::config::DEFAULT_PROFILE.to_string(),
            json!({ "token": default.status() }),
        )]
        .into_iter()
        .collect(),
    };
    let mut v =
        json!({ "token": default.status(), "profiles": profiles, "daemon": (state.daemon)() });
    if let Some(live) = &state.live {
        v["proxy"] = live();
    }
    v
}

/// The token source of the request's `profile` query parameter (none: `default`); `Err`: the
/// message of the 404 for an unknown one.
fn profile_tokens(state: &ControlState, query: Option<&str>) -> Result<TokenSource, String> {
    let name = match query_param(query, "profile") {
        None => return Ok((state.tokens)()),
        Some(n) => percent_decoded(n),
    };
    if name == crate::config::DEFAULT_PROFILE {
        return Ok((state.tokens)());
    }
    let all = state.profiles.as_ref().map(|all| all()).unwrap_or_default();
    if let Some((_, t)) = all.iter().find(|(n, _)| *n == name) {
        return Ok(t.clone());
    }
    let known: Vec<String> = std::iter::once(crate::config::DEFAULT_PROFILE.to_string())
        .chain(
            all.into_iter()
                .map(|(n, _)| n)
                .filter(|n| n != crate::config::DEFAULT_PROFILE),
        )
        .collect();
    Err(super::unknown_profile(&name, &known))
}

async fn handle(state: &ControlState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let tokens = match profile_tokens(state, req.uri().query()) {
        Ok(t) => t,
        Err(message) => {
            return error_response(StatusCode::NOT_FOUND, "unknown_profile", &message);
        }
    };
    match (req.method(), path) {
        (&Method::GET, "/v1/token") => {
            let min_ttl = match query_param(req.uri().query(), "min_ttl") {
                None => Duration::ZERO,
                Some(s) => match parse_ttl(s) {
                    Some(d) => d,
                    None => {
                        return error_response(
                            StatusCode::BAD_REQUEST,
                            "bad_min_ttl",
                            "min_ttl must be seconds or a duration like 60s",
                        );
                    }
                },
            };
            match tokens.get(min_ttl).await {
                Ok(t) => {
                    let now = tokens.clock().now();
                    json_response(
                        StatusCode::OK,
                        &json!({
                            "access_token": t.secret().expose_secret(),
                            "token_type": "Bearer",
                            "expires_at": rfc3339(t.expires_at),
                            "expires_in": t.remaining(now).as_secs(),
                            "claims": t.claims.view(),
                        }),
                    )
                }
                Err(e @ TokenError::TooShort { .. }) => error_response(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "ttl_unavailable",
                    &e.to_string(),
                ),
                Err(e) => error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "token_unavailable",
                    &e.to_string(),
                ),
            }
        }
        (&Method::POST, "/v1/refresh") => match tokens.refresh_now().await {
            Ok(_) => json_response(StatusCode::OK, &status_json(state)),
            Err(e) => error_response(StatusCode::BAD_GATEWAY, &e.code(), &e.to_string()),
        },
        (&Method::GET, "/v1/status") => json_response(StatusCode::OK, &status_json(state)),
        (&Method::GET, "/v1/usage") => match &state.usage {
            Some(usage) => {
                let profile = query_param(req.uri().query(), "profile").map(percent_decoded);
                let report = match query_param(req.uri().query(), "session") {
                    Some(s) => usage.session_report(profile.as_deref(), &percent_decoded(s)),
                    None => match &profile {
                        Some(p) => usage.profile_report(p),
                        None => usage.report(),
                    },
                };
                json_response(StatusCode::OK, &json!(report))
            }
            None => error_response(
                StatusCode::NOT_FOUND,
                "no_usage",
                "this agent keeps no usage counts",
            ),
        },
        (&Method::GET | &Method::POST, "/v1/keys") => match &state.keys {
            Some(keys) => {
                let (keys, method) = (keys.clone(), req.method().clone());
                let query = req.uri().query().map(str::to_owned);
                off_the_loop(move || keys_endpoint(&keys, &method, query.as_deref())).await
            }
            None => no_keys(),
        },
        (&Method::DELETE, p) if p.starts_with("/v1/keys/") => match &state.keys {
            Some(keys) => {
                let (keys, id) = (keys.clone(), percent_decoded(&p["/v1/keys/".len()..]));
                off_the_loop(move || match keys.revoke(&id) {
                    Ok(()) => json_response(StatusCode::OK, &json!({"revoked": true})),
                    Err(e) => keys_error(&e),
                })
                .await
            }
            None => no_keys(),
        },
        (&Method::POST, "/v1/shutdown") => {
            tracing::info!("stop asked for on the control socket: stopping");
            state.shutdown.cancel();
            json_response(
                StatusCode::ACCEPTED,
                &json!({"status": "stopping", "pid": std::process::id()}),
            )
        }
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({"status": "ok"})),
        (&Method::GET, "/readyz") => {
            if tokens.is_ready() {
                json_response(StatusCode::OK, &json!({"status": "ready"}))
            } else {
                let s = tokens.status();
                json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({
                        "status": "not ready",
                        "token": s.state,
                        "last_error": s.last_error,
                        "needs_a_fix": tokens.needs_a_fix(),
                    }),
                )
            }
        }
        (
            _,
            "/v1/token" | "/v1/refresh" | "/v1/status" | "/v1/usage" | "/v1/shutdown" | "/v1/keys"
            | "/healthz" | "/readyz",
        ) => error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "wrong method",
        ),
        _ => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such control endpoint",
        ),
    }
}

/// A keys-file edit (an fsync, perhaps a wait for another process's edit) on the blocking pool,
/// so the proxy sharing this event loop never waits for it.
async fn off_the_loop(
    edit: impl FnOnce() -> Response<Full<Bytes>> + Send + 'static,
) -> Response<Full<Bytes>> {
    tokio::task::spawn_blocking(edit).await.unwrap_or_else(|_| {
        error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "keys_file_error",
            "the keys file edit failed",
        )
    })
}

/// `GET /v1/keys`: the keys (never a key); `POST /v1/keys?name=&profile=&session=&ttl=`: a new
/// key, shown in this answer only.
fn keys_endpoint(keys: &KeyStore, method: &Method, query: Option<&str>) -> Response<Full<Bytes>> {
    if method == Method::GET {
        return match keys.list() {
            Ok(list) => json_response(StatusCode::OK, &json!({ "keys": list })),
            Err(e) => keys_error(&e),
        };
    }
    let param = |name| query_param(query, name).map(percent_decoded);
    let ttl = match param("ttl") {
        None => None,
        Some(s) => match parse_ttl(&s) {
            Some(d) if !d.is_zero() => Some(d),
            _ => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "bad_ttl",
                    "ttl must be more than 0: seconds or a duration like 12h",
                );
            }
        },
    };
    let new = NewKey {
        name: param("name"),
        profile: param("profile"),
        session: param("session"),
        ttl,
    };
    match keys.create(new) {
        Ok((key, entry)) => {
            let mut v = entry.view(0);
            v["key"] = json!(key);
            json_response(StatusCode::CREATED, &v)
        }
        Err(e) => keys_error(&e),
    }
}

fn keys_error(e: &KeysError) -> Response<Full<Bytes>> {
    let (status, code) = match e {
        KeysError::NoSuchKey(_) => (StatusCode::NOT_FOUND, "no_such_key"),
        KeysError::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_key_request"),
        KeysError::Corrupt { .. } => (StatusCode::CONFLICT, "keys_file_invalid"),
        KeysError::Read { .. } | KeysError::Write { .. } => {
            (StatusCode::INTERNAL_SERVER_ERROR, "keys_file_error")
        }
    };
    error_response(status, code, &e.to_string())
}

fn no_keys() -> Response<Full<Bytes>> {
    error_response(
        StatusCode::NOT_FOUND,
        "no_keys_file",
        "this daemon has no keys file: set proxy.keys_file (or a state directory) and restart it",
    )
}

/// Expiry in words for humans.
pub fn expires_words(expires_in: i64) -> String {
    if expires_in >= 0 {
        format!(
            "in {}",
            humantime::format_duration(Duration::from_secs(expires_in as u64))
        )
    } else {
        format!(
            "{} ago",
            humantime::format_duration(Duration::from_secs(expires_in.unsigned_abs()))
        )
    }
}
