//! What the fuzz targets share: the checks that must hold for every input, and, for the targets
//! that go through the proxy, one running stack per fuzzing process (the embedded IdP, a token
//! source, the proxy, the echo upstream that verifies the agent's token, and an "evil" listener
//! that must never be connected to).
//!
//! The proxy's path and header rewriting live in private modules (`proxy::path`,
//! `proxy::forward`), so those targets drive them over loopback TCP, as a client would. That is
//! slower per input than calling a function, and it also fuzzes hyper's parser in front of them.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use behest_agent::clock;
use behest_agent::config::{self, ListenAddr, LoadOptions, TokenSettings, UidCheck};
use behest_agent::proxy::Proxy;
use behest_agent::server::{self, Limits, Listener};
use behest_agent::token::{TokenSource, Verifier};
use devkit::idp::{Idp, IdpOptions};
use devkit::upstream::{BearerKind, Recorded, Upstream, UpstreamOptions};
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

pub const AUDIENCE: &str = "https://api.behest.test";
pub const CLIENT_ID: &str = "fuzz-client";
/// The upstream's base path: every forwarded request must stay under it.
pub const BASE: &str = "/base";
/// Every secret the config target hands the loader starts with this; no output may contain it.
pub const SECRET_PREFIX: &str = "zz-secret-";

// ---------------------------------------------------------------------------------------------
// config_load

/// Files the config target points `client_secret_file`, `private_key_file` and `ca_file` at
/// (through `--set` overrides, which win over the fuzzed file), so an input can never make the
/// loader read `/dev/zero` or a FIFO and hang.
pub struct ConfigFiles {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// secret (with [`SECRET_PREFIX`] content), empty file, a bad PEM, a directory, missing.
    pub choices: Vec<String>,
}

pub fn config_files() -> &'static ConfigFiles {
    static FILES: OnceLock<ConfigFiles> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("secret"), format!("{SECRET_PREFIX}fromfile\n")).unwrap();
        std::fs::write(p("empty"), "").unwrap();
        std::fs::write(
            p("key.pem"),
            "-----BEGIN PRIVATE KEY-----\nAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        std::fs::create_dir(p("dir")).unwrap();
        let choices = ["secret", "empty", "key.pem", "dir", "missing"]
            .iter()
            .map(|n| p(n).display().to_string())
            .collect();
        ConfigFiles {
            config: p("config.toml"),
            dir,
            choices,
        }
    })
}

/// Loads `toml` as the config file; `flags` picks the environment and the files. Panics (a
/// finding) when the loader shows a client secret.
pub fn load_config(flags: u8, toml: &str) -> Result<(), String> {
    let files = config_files();
    std::fs::write(&files.config, toml).unwrap();
    let secret = format!("{SECRET_PREFIX}0123456789abcdef");
    let mut env: HashMap<String, String> = HashMap::new();
    if flags & 1 != 0 {
        for (k, v) in [
            ("BEHEST_AGENT__AUTH__DOMAIN", "example.eu.auth0.com"),
            ("BEHEST_AGENT__AUTH__CLIENT_ID", "abc123"),
            ("BEHEST_AGENT__AUTH__AUDIENCE", AUDIENCE),
        ] {
            env.insert(k.to_string(), v.to_string());
        }
    }
    let var = match (flags >> 1) & 3 {
        0 => "BEHEST_AGENT_CLIENT_SECRET",
        1 => "AUTH0_CLIENT_SECRET",
        2 => "BEHEST_AGENT__AUTH__CLIENT_SECRET",
        _ => "NOT_A_SECRET_VARIABLE",
    };
    env.insert(var.to_string(), secret.clone());
    let pick =
        |shift: u8| files.choices[usize::from((flags >> shift) & 3) % files.choices.len()].clone();
    let mut overrides = vec![
        ("auth.private_key_file".to_string(), pick(3)),
        ("proxy.ca_file".to_string(), pick(5)),
    ];
    if flags & 0x80 != 0 {
        overrides.push((
            "auth.client_secret_file".to_string(),
            files.choices[0].clone(),
        ));
    } else {
        overrides.push((
            "auth.client_secret_file".to_string(),
            files.choices[4].clone(),
        ));
    }
    let result = config::load(&LoadOptions {
        path: Some(files.config.clone()),
        default_path: None,
        env,
        overrides,
    });
    let shown = match &result {
        Ok(s) => format!("{s:?} {:?}", s.warnings),
        Err(e) => format!("{e} {e:?}"),
    };
    assert!(
        !shown.contains(SECRET_PREFIX),
        "the config loader showed a client secret: {shown}"
    );
    result.map(|_| ()).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// claims

/// A current-thread runtime for the async checker (it awaits nothing with verification off).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

/// A checker with signature verification off, as `token.verify_signature = false` configures.
pub fn verifier(uid_check: UidCheck, audience: bool) -> Verifier {
    static HTTP: OnceLock<reqwest::Client> = OnceLock::new();
    let http = HTTP
        .get_or_init(|| behest_agent::auth::http::client(Duration::from_secs(5), None, &Default::default()).unwrap())
        .clone();
    Verifier::new(
        TokenSettings {
            client_id: CLIENT_ID.to_string(),
            uid_claim: "uid".to_string(),
            expected_uid: CLIENT_ID.to_string(),
            uid_check,
            required_claims: vec!["tid".to_string(), "pid".to_string()],
            verify_signature: false,
            refresh_margin: Duration::from_secs(300),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(8),
            cache_file: None,
        },
        audience.then(|| AUDIENCE.to_string()),
        http,
        clock::system(),
    )
}

// ---------------------------------------------------------------------------------------------
// session_path and headers: the proxy over TCP

/// A running proxy in front of the verifying echo upstream.
pub struct Stack {
    pub proxy: SocketAddr,
    pub upstream: Upstream,
    pub upstream_authority: String,
    pub evil: SocketAddr,
    evil_hits: Arc<AtomicU64>,
    _guards: Vec<DropGuard>,
    _rt: Option<tokio::runtime::Runtime>,
}

pub fn stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut stack = rt.block_on(async {
            let secret = "fuzz-client-secret-0123456789";
            let servers = CancellationToken::new();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let idp = Idp::new(
                listener.local_addr().unwrap(),
                IdpOptions::new(CLIENT_ID, secret, AUDIENCE),
            );
            let service = idp.service();
            tokio::spawn(server::serve(
                vec![Listener::Tcp(listener)],
                Limits::LOCAL,
                move |_| service.clone(),
                servers.clone(),
            ));
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let upstream = Upstream::new(
                listener.local_addr().unwrap(),
                UpstreamOptions::for_idp(&idp, AUDIENCE),
            );
            let service = upstream.service(servers.clone());
            tokio::spawn(server::serve(
                vec![Listener::Tcp(listener)],
                Limits::LOCAL,
                move |_| service.clone(),
                servers.clone(),
            ));
            let upstream_url = format!("{}{BASE}", upstream.base_url());
            let upstream_authority = upstream
                .base_url()
                .trim_start_matches("http://")
                .to_string();
            let evil = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let evil_addr = evil.local_addr().unwrap();
            let evil_hits = Arc::new(AtomicU64::new(0));
            let hits = evil_hits.clone();
            tokio::spawn(async move {
                while evil.accept().await.is_ok() {
                    hits.fetch_add(1, Ordering::SeqCst);
                }
            });
            let env: HashMap<String, String> = [
                ("BEHEST_AGENT__AUTH__DOMAIN", idp.base_url()),
                ("BEHEST_AGENT__AUTH__AUDIENCE", AUDIENCE.to_string()),
                ("BEHEST_AGENT__AUTH__CLIENT_ID", CLIENT_ID.to_string()),
                ("AUTH0_CLIENT_SECRET", secret.to_string()),
                ("BEHEST_AGENT__TOKEN__CACHE_FILE", String::new()),
                ("BEHEST_AGENT__PROXY__LISTEN", "127.0.0.1:0".to_string()),
                ("BEHEST_AGENT__PROXY__UPSTREAM", upstream_url),
                (
                    "BEHEST_AGENT__PROXY__ALLOW_INSECURE_UPSTREAM",
                    "true".to_string(),
                ),
                // An input that leaves a head or a body incomplete costs 2 s, not minutes.
                ("BEHEST_AGENT__PROXY__HEADER_READ_TIMEOUT", "2s".to_string()),
                ("BEHEST_AGENT__PROXY__IDLE_TIMEOUT", "2s".to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            let settings = config::load(&LoadOptions {
                env,
                ..LoadOptions::default()
            })
            .unwrap();
            let tokens = TokenSource::new(&settings, clock::system()).unwrap();
            tokens
                .get(Duration::ZERO)
                .await
                .expect("a token from the embedded IdP");
            let proxy = Proxy::new(&settings.proxy, tokens).unwrap();
            let listeners = Proxy::bind(&settings.proxy.listen).await.unwrap();
            let ListenAddr::Tcp(addr) = listeners[0].local_addr().unwrap() else {
                unreachable!()
            };
            let stop = CancellationToken::new();
            let s = stop.clone();
            tokio::spawn(async move { proxy.serve(listeners, s).await });
            Stack {
                proxy: addr,
                upstream,
                upstream_authority,
                evil: evil_addr,
                evil_hits,
                _guards: vec![servers.drop_guard(), stop.drop_guard()],
                _rt: None,
            }
        });
        // The stack's tasks run on this runtime: it lives as long as the stack.
        stack._rt = Some(rt);
        stack
    })
}

impl Stack {
    /// `Host` the proxy accepts.
    pub fn host(&self) -> String {
        self.proxy.to_string()
    }

    pub fn seen(&self) -> u64 {
        self.upstream.request_count()
    }

    /// Writes `bytes` on a new connection and reads until the proxy closes it (or 5 s pass).
    /// The write side stays open: hyper takes a half-close for a client gone away and drops the
    /// request. Heads and bodies that never complete are cut by the stack's 2 s timeouts.
    pub fn exchange(&self, bytes: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(self.proxy).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(bytes);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    }

    /// The invariants for every request the upstream received after the first `before`: the
    /// configured `Host`, a path under the base path, one `Authorization`, carrying the agent's
    /// token (it verified, for this client), no `Proxy-Authorization`, nothing containing
    /// `marker`; and no connection ever reached the evil listener.
    pub fn assert_invariants(&self, before: u64, marker: Option<&str>) {
        assert_eq!(
            self.evil_hits.load(Ordering::SeqCst),
            0,
            "the evil listener was reached"
        );
        let all = self.upstream.requests();
        let new = (self.seen() - before) as usize;
        if std::env::var_os("FUZZ_DEBUG").is_some() {
            eprintln!(
                "forwarded {new}: {:?}",
                all.last().map(|r| (&r.path, r.bearer))
            );
        }
        for r in all.iter().rev().take(new) {
            check_request(self, r, marker);
        }
    }
}

fn check_request(stack: &Stack, r: &Recorded, marker: Option<&str>) {
    let hosts: Vec<&str> = r
        .headers
        .iter()
        .filter(|(n, _)| n == "host")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(hosts, [stack.upstream_authority.as_str()], "{r:?}");
    let path = r.path.split('?').next().unwrap_or("");
    assert!(
        under_base(path),
        "the upstream path {path:?} leaves {BASE}/: {r:?}"
    );
    let auths = r
        .headers
        .iter()
        .filter(|(n, _)| n == "authorization")
        .count();
    assert_eq!(auths, 1, "{r:?}");
    let has = |name: &str| r.headers.iter().any(|(n, _)| n == name);
    assert!(
        !(has("content-length") && has("transfer-encoding")),
        "the upstream got conflicting framing: {r:?}"
    );
    assert_eq!(r.bearer, BearerKind::Jwt, "{r:?}");
    let uid = r
        .claims
        .as_ref()
        .and_then(|c| c["uid"].as_str().map(String::from));
    assert_eq!(
        uid.as_deref(),
        Some(CLIENT_ID),
        "the upstream saw another token: {r:?}"
    );
    assert!(
        r.headers.iter().all(|(n, _)| n != "proxy-authorization"),
        "{r:?}"
    );
    if let Some(m) = marker {
        for (n, v) in &r.headers {
            assert!(
                !v.contains(m) && !n.contains(m),
                "a client credential reached the upstream: {r:?}"
            );
        }
        assert!(!r.path.contains(m), "{r:?}");
    }
}

/// `path` is under the base path once percent-decoded and dot segments are removed the way an
/// upstream server might (RFC 3986 §5.2.4, with `%2e` read as `.`).
pub fn under_base(path: &str) -> bool {
    let prefix = format!("{BASE}/");
    if !path.starts_with(&prefix) {
        return false;
    }
    let mut kept: Vec<String> = Vec::new();
    for seg in path[1..].split('/') {
        let seg = percent_encoding::percent_decode_str(seg)
            .decode_utf8_lossy()
            .into_owned();
        if seg.contains('/') || seg.contains('\\') {
            return false;
        }
        match seg.as_str() {
            "." => {}
            ".." => {
                if kept.pop().is_none() {
                    return false;
                }
            }
            _ => kept.push(seg),
        }
    }
    kept.first().map(String::as_str) == Some(&BASE[1..])
}
