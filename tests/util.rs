//! Shared test helpers: the devkit servers started on `127.0.0.1:0` ([`Start`]), an embedded IdP
//! with a random client, settings built from an environment map (never the process environment),
//! and log capture for the secret-leak checks.

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use behest_agent::clock::SharedClock;
use behest_agent::config::{self, LoadOptions, Settings};
use behest_agent::server::{self, Limits, Listener};
use behest_agent::token::TokenSource;
use devkit::Now;
use devkit::idp::{Idp, IdpOptions};
use devkit::upstream::{Upstream, UpstreamOptions};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

pub const AUDIENCE: &str = "https://api.behest.test";

/// The test certificates: a CA, a server certificate for 127.0.0.1 it issued, and one that is its
/// own CA.
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// A TLS server configuration with the certificate chain and key in these fixture files.
pub fn tls_server_config(cert: &str, key: &str) -> rustls::ServerConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    behest_agent::tls::install_default_provider();
    let certs = CertificateDer::pem_file_iter(format!("{FIXTURES}/{cert}")).unwrap();
    let key = PrivateKeyDer::from_pem_file(format!("{FIXTURES}/{key}")).unwrap();
    rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs.map(Result::unwrap).collect(), key)
        .unwrap()
}

/// The devkit servers' limits: a local server's, with room for as many connections as the proxy
/// accepts by default, so a burst through the proxy never waits in the upstream's backlog.
const LIMITS: Limits = Limits {
    max_connections: 4096,
    ..Limits::LOCAL
};

/// A devkit server started on `127.0.0.1:0` and served by the agent's own [`server::serve`] until
/// the returned guard is dropped.
pub trait Start: Sized {
    type Options;

    fn start(opts: Self::Options) -> impl Future<Output = io::Result<(Self, DropGuard)>> + Send;
}

impl Start for Idp {
    type Options = IdpOptions;

    async fn start(opts: IdpOptions) -> io::Result<(Idp, DropGuard)> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let idp = Idp::new(listener.local_addr()?, opts);
        let (service, stop) = (idp.service(), CancellationToken::new());
        let listeners = vec![Listener::Tcp(listener)];
        tokio::spawn(server::serve(
            listeners,
            LIMITS,
            move |_| service.clone(),
            stop.clone(),
        ));
        Ok((idp, stop.drop_guard()))
    }
}

impl Start for Upstream {
    type Options = UpstreamOptions;

    async fn start(opts: UpstreamOptions) -> io::Result<(Upstream, DropGuard)> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let upstream = Upstream::new(listener.local_addr()?, opts);
        let stop = CancellationToken::new();
        let service = upstream.service(stop.clone());
        let listeners = vec![Listener::Tcp(listener)];
        tokio::spawn(server::serve(
            listeners,
            LIMITS,
            move |_| service.for_connection(),
            stop.clone(),
        ));
        Ok((upstream, stop.drop_guard()))
    }
}

/// The agent's clock as the devkit servers read time, for a test that jumps it for both.
pub fn devkit_now(clock: SharedClock) -> Now {
    Now::from_fn(move || clock.now())
}

/// Everything the agent's library logged in this test process (debug level, text format).
static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber once per process.
pub fn capture_logs() {
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = Capture(buf.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        buf
    });
}

/// All captured log text so far.
pub fn logs() -> String {
    capture_logs();
    String::from_utf8_lossy(&LOGS.get().unwrap().lock().unwrap()).into_owned()
}

/// Fails when any of `secrets` appears in `text`.
pub fn assert_no_secret_in(text: &str, secrets: &[String], what: &str) {
    for s in secrets {
        assert!(
            s.len() >= 8,
            "a secret to look for must be long enough to mean something"
        );
        assert!(
            !text.contains(s.as_str()),
            "{what} contains a secret (first chars {:?})",
            &s[..6]
        );
    }
}

/// Reads an HTTP request head from `s`, up to its blank line (with whatever came after it in the
/// same reads); `None` when the connection ends or fails first.
pub async fn read_head(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

pub fn random(len: usize) -> String {
    let mut bytes = vec![0u8; len];
    aws_lc_rs::rand::fill(&mut bytes).unwrap();
    bytes
        .iter()
        .map(|b| format!("{:02x}", b))
        .collect::<String>()[..len]
        .to_string()
}

/// An embedded IdP with one client, and a temporary directory for the agent's files.
pub struct Harness {
    pub idp: Idp,
    /// Serves the IdP until taken ([`Harness::stop_idp`]) or dropped.
    idp_serving: Mutex<Option<DropGuard>>,
    pub dir: TempDir,
    pub client_id: String,
    pub secret: String,
    /// Secrets this test must never see logged (the client secret, tokens seen, keys).
    pub secrets: Mutex<Vec<String>>,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(edit: impl FnOnce(&mut IdpOptions)) -> Harness {
        capture_logs();
        let client_id = format!("client-{}", random(12));
        let secret = format!("sec-{}", random(32));
        let mut opts = IdpOptions::new(&client_id, &secret, AUDIENCE);
        edit(&mut opts);
        let (idp, stop) = Idp::start(opts).await.expect("the IdP starts");
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("client-secret");
        std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
        set_mode(&secret_file, 0o600);
        Harness {
            idp,
            idp_serving: Mutex::new(Some(stop)),
            dir,
            client_id,
            secrets: Mutex::new(vec![secret.clone()]),
            secret,
        }
    }

    /// Stops serving the IdP, and returns once its port refuses connections (an outage).
    pub async fn stop_idp(&self) {
        self.idp_serving.lock().unwrap().take();
        let addr = self
            .idp
            .base_url()
            .trim_start_matches("http://")
            .to_string();
        eventually(Duration::from_secs(30), "the IdP's port closed", || {
            std::net::TcpStream::connect(&addr).is_err()
        })
        .await;
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The environment a test agent runs with: everything through `BEHEST_AGENT__` keys.
    pub fn env(&self, extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut env: HashMap<String, String> = [
            ("BEHEST_AGENT__AUTH__DOMAIN", self.idp.base_url()),
            ("BEHEST_AGENT__AUTH__AUDIENCE", AUDIENCE.to_string()),
            ("BEHEST_AGENT__AUTH__CLIENT_ID", self.client_id.clone()),
            (
                "BEHEST_AGENT__AUTH__CLIENT_SECRET_FILE",
                self.path("client-secret").display().to_string(),
            ),
            (
                "BEHEST_AGENT__TOKEN__CACHE_FILE",
                self.path("state/token.json").display().to_string(),
            ),
            (
                "BEHEST_AGENT__CONTROL__SOCKET",
                self.path("run/agent.sock").display().to_string(),
            ),
            // Never the default 8711: tests run in parallel, next to whatever else the machine runs.
            ("BEHEST_AGENT__PROXY__LISTEN", "127.0.0.1:0".to_string()),
            ("BEHEST_AGENT__TOKEN__MIN_BACKOFF", "1s".to_string()),
            ("BEHEST_AGENT__TOKEN__MAX_BACKOFF", "8s".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for (k, v) in extra {
            env.insert(k.to_string(), v.to_string());
        }
        env
    }

    pub fn settings(&self, extra: &[(&str, &str)]) -> Settings {
        config::load(&LoadOptions {
            path: None,
            default_path: None,
            env: self.env(extra),
            overrides: vec![],
        })
        .expect("test settings are valid")
    }

    pub fn source(&self, extra: &[(&str, &str)], clock: SharedClock) -> TokenSource {
        TokenSource::new(&self.settings(extra), clock).expect("the token source builds")
    }

    /// The real binary with this harness's environment (and nothing of the test process's but
    /// `PATH`), killed when dropped.
    pub fn agent(&self, args: &[&str], extra: &[(&str, &str)]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_behest-agent"));
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .envs(self.env(extra))
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        c
    }

    /// [`Harness::agent`] with its proxy pointed at a plain-http echo upstream.
    pub fn agent_with_upstream(
        &self,
        upstream: &str,
        args: &[&str],
        extra: &[(&str, &str)],
    ) -> tokio::process::Command {
        let mut env = vec![
            ("BEHEST_AGENT__PROXY__UPSTREAM", upstream),
            ("BEHEST_AGENT__PROXY__ALLOW_INSECURE_UPSTREAM", "true"),
        ];
        env.extend_from_slice(extra);
        self.agent(args, &env)
    }

    /// Remembers a secret to look for in the logs.
    pub fn remember(&self, secret: &str) {
        self.secrets.lock().unwrap().push(secret.to_string());
    }

    /// No secret this test saw is in the captured logs.
    pub fn assert_no_secrets_logged(&self) {
        let secrets = self.secrets.lock().unwrap().clone();
        assert_no_secret_in(&logs(), &secrets, "the agent's logs");
    }
}

pub fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

pub fn mode_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Polls `cond` until it holds or `deadline` passes.
pub async fn eventually(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + deadline;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An RSA key pair for private_key_jwt: the private PKCS#8 PEM and the public JWK (n, e).
pub fn rsa_client_key() -> (String, serde_json::Value) {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rsa::{KeySize, PublicKeyComponents};
    use aws_lc_rs::signature::{KeyPair, RsaKeyPair};
    use base64::Engine;
    let pair = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
    let der = pair.as_der().unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    let public = PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwk = serde_json::json!({
        "kty": "RSA", "use": "sig", "alg": "RS256", "kid": "ci-key-1",
        "n": url.encode(&public.n), "e": url.encode(&public.e),
    });
    (pem, jwk)
}

/// Sends `sig` to a spawned agent.
pub fn signal(child: &tokio::process::Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id().unwrap() as i32), sig).unwrap();
}

/// The agent must exit with status 0 within 30 s.
pub async fn exits_cleanly(child: &mut tokio::process::Child) {
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the agent exits within 30 s")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// The path of `binary`, installing Debian's `package` first when it is missing (the tests start
/// their own servers from it; `.ci/run` does the same before the suite). Installing needs root and
/// the Debian archive: without either, a clear panic says what to install.
pub fn debian_binary(binary: &str, package: &str) -> PathBuf {
    static INSTALL: Mutex<()> = Mutex::new(());
    let find = || {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(binary))
                .find(|p| p.is_file())
        })
    };
    let _one_at_a_time = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = find().or_else(|| {
        let usr = PathBuf::from("/usr/bin").join(binary);
        usr.is_file().then_some(usr)
    }) {
        return path;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need `{binary}`: install Debian's `{package}` package (apt-get install {package}), as .ci/run does"
    );
    let status = std::process::Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(std::process::Stdio::null())
        .status()
        .expect("apt-get runs");
    assert!(status.success(), "apt-get install {package} failed");
    find().unwrap_or_else(|| PathBuf::from("/usr/bin").join(binary))
}

/// What a finished command printed, and its exit code (-1 when a signal ended it).
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `c` to its end; a command still running after 120 s is a hang and fails the test.
pub async fn output(mut c: tokio::process::Command) -> Out {
    let o = tokio::time::timeout(std::time::Duration::from_secs(120), c.output())
        .await
        .expect("the command hung (no end within 120 s)")
        .expect("the command runs");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}
