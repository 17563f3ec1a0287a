//! The control API client the CLI uses. [`Daemon::connect`] is the one way every command finds a
//! daemon: it connects to the socket, trusts it only when the process behind it is this user, root
//! or the service's user (`SO_PEERCRED`), reads `/v1/status`, and — when the CLI has a
//! configuration of its own — refuses a daemon that serves another identity. Every later call
//! checks the peer again (the path could be replaced in between). Every wait is bounded: a daemon
//! that accepts connections but never answers (stopped, hung) is [`ControlError::NoAnswer`], not a
//! hang.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

use super::Identity;
use crate::config::Settings;

/// How long a daemon may take to accept a connection and to answer a request it answers from
/// memory (`/v1/status`); a healthy one takes well under a millisecond.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// The user the packaged service runs as: its sockets are trusted like this user's own.
pub const SERVICE_USER: &str = "behest-agent";
/// The largest answer read from the daemon: its usage counts, up to
/// [`MAX_SESSIONS`](crate::usage::MAX_SESSIONS) sessions of up to 64 models, run to ~200 MB.
const MAX_BODY: usize = 256 << 20;
/// `auth.timeout`'s default, for a CLI without settings.
const DEFAULT_GRANT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a daemon could not be used. [`ControlError::NoAnswer`] is the one case where a daemon may
/// exist but says nothing; [`ControlError::Refused`] is the daemon's own answer to a request; the
/// others mean the socket must not be trusted, or cannot be.
#[derive(Debug)]
pub enum ControlError {
    /// Something accepted the connection (or left it pending) but did not answer in time: the
    /// daemon is stopped (SIGSTOP), hung or overloaded.
    NoAnswer { path: PathBuf, waited: Duration },
    /// This user may not connect to the socket.
    Denied { path: PathBuf },
    /// The process behind the socket runs as another user: it may have been planted.
    Untrusted {
        path: PathBuf,
        uid: u32,
        user: Option<String>,
    },
    /// The daemon does not say which identity it serves (an older version still running).
    Unidentified { path: PathBuf, version: String },
    /// The daemon serves another identity than the CLI's configuration.
    OtherIdentity {
        path: PathBuf,
        pid: Option<u64>,
        /// The daemon's config file (`None`: from its environment only).
        daemon_config: Option<String>,
        /// The CLI's config file, or a phrase for the environment.
        config: String,
        /// `(key, the daemon's value, the CLI's value)`.
        differences: Vec<(&'static str, String, String)>,
    },
    /// Something answered, but not as the control API does.
    Invalid { path: PathBuf, message: String },
    /// The daemon reports a proxy address a job must not be pointed at.
    UnsafeAddress { path: PathBuf, address: String },
    /// The daemon does not serve the profile a command names (a usage error, as an unknown
    /// profile of the CLI's own configuration is).
    UnknownProfile {
        name: String,
        /// The profiles it serves, `default` too.
        profiles: Vec<String>,
    },
    /// The daemon answered the request with an error: its message.
    Refused {
        status: StatusCode,
        code: Option<String>,
        message: String,
    },
    /// The connection failed.
    Io { path: PathBuf, message: String },
    /// The configuration that names the socket does not load (a usage error): no socket is
    /// guessed in its place.
    Config(crate::config::ConfigError),
}

impl ControlError {
    /// Whether this is a usage error: the daemon's refusal of a profile it does not serve (by
    /// the CLI's check of its status or by its control API's `unknown_profile` answer), or a
    /// configuration that does not load.
    pub fn is_usage(&self) -> bool {
        match self {
            ControlError::UnknownProfile { .. } | ControlError::Config(_) => true,
            ControlError::Refused { code, .. } => code.as_deref() == Some("unknown_profile"),
            _ => false,
        }
    }

    /// What is wrong.
    pub fn problem(&self) -> String {
        match self {
            ControlError::NoAnswer { path, waited } => format!(
                "no daemon answered in time: something accepted the connection on {} but did not answer within {}",
                path.display(),
                humantime::format_duration(*waited)
            ),
            ControlError::Denied { path } => {
                format!("this user may not connect to {}", path.display())
            }
            ControlError::Untrusted { path, uid, user } => format!(
                "{} is served by {} (uid {uid}), not by this user, root or the service's user `{SERVICE_USER}`: another user may have put it there to hand out their token or to read your requests",
                path.display(),
                user.as_deref()
                    .map(|u| format!("user `{u}`"))
                    .unwrap_or_else(|| "another user".into()),
            ),
            ControlError::Unidentified { path, version } => format!(
                "the daemon on {} (version {version}) does not say which identity it serves",
                path.display()
            ),
            ControlError::OtherIdentity {
                path,
                pid,
                daemon_config,
                config,
                differences,
            } => {
                let diffs: Vec<String> = differences
                    .iter()
                    .map(|(k, theirs, ours)| format!("{k} `{theirs}` there, `{ours}` here"))
                    .collect();
                format!(
                    "the daemon on {} (pid {}, {}) serves another identity than {config}: {}",
                    path.display(),
                    pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                    daemon_config
                        .as_deref()
                        .map(|c| format!("config {c}"))
                        .unwrap_or_else(|| "configured by its environment".into()),
                    diffs.join(", ")
                )
            }
            ControlError::Invalid { path, message } => format!(
                "{} answered, but not as the agent's control API: {message}",
                path.display()
            ),
            ControlError::UnsafeAddress { path, address } => format!(
                "the daemon on {} reports the proxy address `{address}`, which is not a loopback address: refusing to point a job at it",
                path.display()
            ),
            ControlError::UnknownProfile { name, profiles } => {
                super::unknown_profile(name, profiles)
            }
            ControlError::Refused { message, .. } => message.clone(),
            ControlError::Config(e) => e.to_string(),
            ControlError::Io { path, message } => format!(
                "the daemon's control socket {} failed: {message}",
                path.display()
            ),
        }
    }

    /// What to do about it (empty when the problem says it).
    pub fn fix(&self) -> String {
        match self {
            ControlError::NoAnswer { .. } => "the daemon is stopped, hung or overloaded: check it (`systemctl status behest-agent`, its log) and restart it if it stays so".into(),
            ControlError::Denied { .. } => format!(
                "add this user to the socket's group (for the service: `sudo usermod -aG {SERVICE_USER} $USER`, then log in again), or set control.socket to a daemon of your own"
            ),
            ControlError::Untrusted { .. } => "do not use it: remove it (or have an administrator do so), and set control.socket to your daemon's socket".into(),
            ControlError::Unidentified { .. } => "restart the daemon so that it runs this version of behest-agent (`systemctl restart behest-agent`)".into(),
            ControlError::OtherIdentity {
                pid,
                daemon_config,
                config,
                ..
            } => format!(
                "if {config} is what the daemon should serve, reload it (`systemctl reload behest-agent`{}); otherwise point --config at the daemon's configuration{}",
                pid.map(|p| format!(", or `kill -HUP {p}`")).unwrap_or_default(),
                daemon_config
                    .as_deref()
                    .map(|c| format!(" ({c})"))
                    .unwrap_or_default(),
            ),
            ControlError::Invalid { .. } => {
                "stop whatever listens there, or set control.socket to the daemon's socket".into()
            }
            ControlError::UnsafeAddress { .. } => "give proxy.listen a loopback address (such as 127.0.0.1:8711) and reload the daemon".into(),
            ControlError::UnknownProfile { .. }
            | ControlError::Refused { .. }
            | ControlError::Io { .. }
            | ControlError::Config(_) => String::new(),
        }
    }
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.fix() {
            fix if fix.is_empty() => write!(f, "{}", self.problem()),
            fix => write!(f, "{}; {fix}", self.problem()),
        }
    }
}

impl std::error::Error for ControlError {}

/// A running daemon the CLI may use: its peer checked, its identity the configuration's.
#[derive(Debug, Clone)]
pub struct Daemon {
    path: PathBuf,
    /// Its `/v1/status` when it was found.
    status: Value,
}

impl Daemon {
    /// The daemon on `socket`: `Ok(None)` when none runs there (no socket, or a stale one). With
    /// `settings`, a daemon serving another identity is an error.
    pub async fn connect(
        socket: &Path,
        settings: Option<&Settings>,
    ) -> Result<Option<Daemon>, ControlError> {
        let Some(stream) = open(socket).await? else {
            return Ok(None);
        };
        let (code, status) =
            exchange(socket, stream, Method::GET, "/v1/status", ANSWER_TIMEOUT).await?;
        if code != StatusCode::OK || !status["daemon"].is_object() {
            return Err(ControlError::Invalid {
                path: socket.to_path_buf(),
                message: format!("GET /v1/status answered HTTP {}", code.as_u16()),
            });
        }
        let daemon = Daemon {
            path: socket.to_path_buf(),
            status,
        };
        if let Some(s) = settings {
            daemon.check_identity(s)?;
        }
        Ok(Some(daemon))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its `/v1/status` document when it was found.
    pub fn status(&self) -> &Value {
        &self.status
    }

    /// `Ok` when the daemon serves `profile` (`None`: `default`), by its `/v1/status`; else
    /// [`ControlError::UnknownProfile`]. A daemon that does not list its profiles (an older
    /// version) is not checked: its control API refuses an unknown one itself.
    pub fn check_profile(&self, profile: Option<&str>) -> Result<(), ControlError> {
        let (Some(name), Some(Value::Object(served))) =
            (profile, self.status.pointer("/daemon/profiles"))
        else {
            return Ok(());
        };
        if served.contains_key(name) {
            return Ok(());
        }
        let default = crate::config::DEFAULT_PROFILE;
        let profiles = served
            .keys()
            .filter(|n| *n == default)
            .chain(served.keys().filter(|n| *n != default))
            .cloned()
            .collect();
        Err(ControlError::UnknownProfile {
            name: name.to_string(),
            profiles,
        })
    }

    /// How long to wait for an answer that may need a grant (`/v1/token`, `/v1/refresh`): the
    /// grant's own bound, twice (one may be in flight already), and a margin.
    pub fn grant_wait(settings: Option<&Settings>) -> Duration {
        let grant = settings.map_or(DEFAULT_GRANT_TIMEOUT, |s| s.auth.timeout);
        grant * 2 + ANSWER_TIMEOUT
    }

    /// Sends one request on a new connection (its peer checked again); the status and the JSON
    /// body, within `wait`.
    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        wait: Duration,
    ) -> Result<(StatusCode, Value), ControlError> {
        let stream = open(&self.path).await?.ok_or_else(|| ControlError::Io {
            path: self.path.clone(),
            message: "the daemon stopped".into(),
        })?;
        exchange(&self.path, stream, method, uri, wait).await
    }

    /// [`Daemon::call`], with an answer other than 2xx as [`ControlError::Refused`].
    pub async fn request(
        &self,
        method: Method,
        uri: &str,
        wait: Duration,
    ) -> Result<Value, ControlError> {
        let (status, body) = self.call(method, uri, wait).await?;
        if status.is_success() {
            return Ok(body);
        }
        Err(ControlError::Refused {
            status,
            code: body
                .pointer("/error/code")
                .and_then(Value::as_str)
                .map(String::from),
            message: error_message(&body, status),
        })
    }

    /// The daemon's proxy addresses as it reports them (none: it runs no proxy).
    pub fn proxy_listen(&self) -> Vec<&str> {
        self.status
            .pointer("/daemon/listen")
            .and_then(Value::as_array)
            .map(|l| l.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    }

    /// The address a job should use for the daemon's proxy: its first TCP listener, an
    /// unspecified address (`0.0.0.0`) as loopback; `None` when it serves no TCP listener. Every
    /// address it reports must be a loopback (or unspecified) `IP:PORT` or `unix:PATH`: the CLI
    /// writes it into a job's environment, so a remote host, or a newline or quote in it, is
    /// refused.
    pub fn proxy_address(&self) -> Result<Option<SocketAddr>, ControlError> {
        let invalid = |message: String| ControlError::Invalid {
            path: self.path.clone(),
            message,
        };
        let list = match self.status.pointer("/daemon/listen") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Array(l)) => l,
            Some(_) => return Err(invalid("daemon.listen is not a list".into())),
        };
        let mut first = None;
        for entry in list {
            let s = entry
                .as_str()
                .ok_or_else(|| invalid("daemon.listen holds a non-string".into()))?;
            if let Some(p) = s.strip_prefix("unix:") {
                if p.is_empty() || p.chars().any(char::is_control) {
                    return Err(invalid(format!("proxy address `{}`", s.escape_debug())));
                }
                continue;
            }
            let unsafe_address = || ControlError::UnsafeAddress {
                path: self.path.clone(),
                address: s.escape_debug().to_string(),
            };
            let mut addr: SocketAddr = s.parse().map_err(|_| unsafe_address())?;
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr.ip() {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                });
            }
            if !addr.ip().is_loopback() {
                return Err(unsafe_address());
            }
            first.get_or_insert(addr);
        }
        Ok(first)
    }

    /// The daemon's identity for the settings' profile is the settings' own. A daemon without
    /// that profile is one serving another identity.
    fn check_identity(&self, settings: &Settings) -> Result<(), ControlError> {
        let d = &self.status["daemon"];
        let name = settings.profile_name.as_str();
        let identity = match d.get("profiles") {
            // A daemon with profiles names each one's identity.
            Some(Value::Object(all)) => all.get(name),
            // An older one serves `default` only.
            _ if name == crate::config::DEFAULT_PROFILE => d.get("identity"),
            _ => None,
        };
        let other = |differences| ControlError::OtherIdentity {
            path: self.path.clone(),
            pid: d["pid"].as_u64(),
            daemon_config: d["config"].as_str().map(String::from),
            config: settings
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "this configuration (from the environment)".into()),
            differences,
        };
        if identity.is_none()
            && name != crate::config::DEFAULT_PROFILE
            && d.get("identity").is_some()
        {
            return Err(other(vec![(
                "profile",
                "(none)".to_string(),
                name.to_string(),
            )]));
        }
        let Some(theirs) =
            identity.and_then(|i| serde_json::from_value::<Identity>(i.clone()).ok())
        else {
            return Err(ControlError::Unidentified {
                path: self.path.clone(),
                version: d["version"].as_str().unwrap_or("?").to_string(),
            });
        };
        let differences = theirs.differences(&Identity::of(&settings.auth));
        if differences.is_empty() {
            return Ok(());
        }
        Err(other(differences))
    }
}

/// Connects to `path` and checks the peer: `Ok(None)` when nothing listens there.
async fn open(path: &Path) -> Result<Option<UnixStream>, ControlError> {
    let stream = match tokio::time::timeout(ANSWER_TIMEOUT, UnixStream::connect(path)).await {
        Err(_) => {
            return Err(ControlError::NoAnswer {
                path: path.to_path_buf(),
                waited: ANSWER_TIMEOUT,
            });
        }
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            use std::io::ErrorKind::*;
            return match e.kind() {
                NotFound | ConnectionRefused | NotADirectory => Ok(None),
                PermissionDenied => Err(ControlError::Denied {
                    path: path.to_path_buf(),
                }),
                _ => Err(ControlError::Io {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                }),
            };
        }
    };
    let uid = stream
        .peer_cred()
        .map_err(|e| ControlError::Io {
            path: path.to_path_buf(),
            message: format!("cannot tell who serves it: {e}"),
        })?
        .uid();
    if !trusted(uid) {
        return Err(ControlError::Untrusted {
            path: path.to_path_buf(),
            uid,
            user: nix::unistd::User::from_uid(uid.into())
                .ok()
                .flatten()
                .map(|u| u.name),
        });
    }
    Ok(Some(stream))
}

/// This user, root, or the service's user.
fn trusted(uid: u32) -> bool {
    uid == nix::unistd::geteuid().as_raw()
        || uid == 0
        || nix::unistd::User::from_name(SERVICE_USER)
            .ok()
            .flatten()
            .is_some_and(|u| u.uid.as_raw() == uid)
}

/// One request on `stream`, answered (head and body) within `wait`.
async fn exchange(
    path: &Path,
    stream: UnixStream,
    method: Method,
    uri: &str,
    wait: Duration,
) -> Result<(StatusCode, Value), ControlError> {
    let io_err = |message: String| ControlError::Io {
        path: path.to_path_buf(),
        message,
    };
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header(http::header::HOST, "behest-agent")
        .body(Full::new(Bytes::new()))
        .expect("a control request builds");
    let exchange = async {
        let (mut sender, mut conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| io_err(e.to_string()))?;
        let answer = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| io_err(e.to_string()))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| io_err(e.to_string()))?
                .to_bytes();
            Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
        };
        tokio::pin!(answer);
        // The connection is driven here, not spawned: when the wait is over, both are dropped.
        tokio::select! {
            biased;
            r = &mut answer => r,
            _ = &mut conn => answer.await,
        }
    };
    tokio::time::timeout(wait, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(ControlError::NoAnswer {
                path: path.to_path_buf(),
                waited: wait,
            })
        })
}

/// The `error.message` of an error body, or a fallback.
pub fn error_message(body: &Value, status: StatusCode) -> String {
    body.pointer("/error/message")
        .and_then(Value::as_str)
        .map(String::from)
        .unwrap_or_else(|| format!("the daemon answered HTTP {}", status.as_u16()))
}
