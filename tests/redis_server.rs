//! A `redis-server` of the test's own (Debian's package) on a free loopback port, with no
//! persistence, ended when dropped. Missing under `CI=true` it is a failure that says so; outside
//! CI the test installs it first with `.ci/install-redis`, as `.ci/run` does.

// A helper module: not every test uses every helper.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tempfile::TempDir;

/// How long a starting server may take to answer `PING`.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// The `redis-server` binary, installed when missing outside CI; panics with the fix otherwise.
fn binary() -> PathBuf {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Some(p) = find() {
                return Ok(p);
            }
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                return Err(
                    "redis-server is not installed: the fleet tests need Debian's \
                            redis-server package (.ci/run installs it with .ci/install-redis)"
                        .to_string(),
                );
            }
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/install-redis");
            let status = Command::new(&script)
                .stdin(Stdio::null())
                .status()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            find().ok_or_else(|| {
                format!(
                    "redis-server is not installed and {} could not install it ({status}); \
                     run `apt-get install -y redis-server` as root",
                    script.display()
                )
            })
        })
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn find() -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/bin", "/usr/sbin", "/usr/local/bin"])
        .map(|d| Path::new(d).join("redis-server"))
        .find(|p| p.is_file())
}

/// A free loopback port: bound to port 0, then released (the start retries on a collision).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    extra: Vec<String>,
    dir: TempDir,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        Self::start_with(&[]).await
    }

    /// A server with these extra `redis-server` arguments (e.g. TLS ones).
    pub async fn start_with(extra: &[&str]) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let mut server = RedisServer {
            child: None,
            port: 0,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir,
        };
        let mut last = String::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.spawn().await {
                Ok(()) => return server,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start: {last}");
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A connection of the test's own, to look at or tamper with what the agents stored.
    pub async fn connection(&self) -> MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("the test connects to its redis-server")
    }

    /// Kills the server at once (SIGKILL), as a crash or a network cut would end it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub async fn restart(&mut self) {
        self.kill();
        let mut last = String::new();
        for _ in 0..50 {
            match self.spawn().await {
                Ok(()) => return,
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "redis-server did not start again on port {}: {last}",
            self.port
        );
    }

    async fn spawn(&mut self) -> Result<(), String> {
        let log = self.dir.path().join("redis.log");
        let mut args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            self.dir.path().to_str().unwrap(),
            "--logfile",
            log.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(
            self.extra
                .iter()
                .map(|a| a.replace("{port}", &self.port.to_string())),
        );
        let mut child = Command::new(binary())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run redis-server: {e}"))?;
        let end = tokio::time::Instant::now() + START_DEADLINE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("it exited ({status}): {}", text.trim()));
            }
            if self.answers().await {
                self.child = Some(child);
                return Ok(());
            }
            if tokio::time::Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                return Err("no answer to PING within 20 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Answers PING on its plain port (a TLS-only server is waited for on its log instead).
    async fn answers(&self) -> bool {
        if self.extra.iter().any(|a| a == "--tls-port") {
            let log =
                std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
            return log.contains("Ready to accept connections");
        }
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        match tokio::time::timeout(
            Duration::from_secs(1),
            client.get_multiplexed_async_connection(),
        )
        .await
        {
            Ok(Ok(mut c)) => redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .is_ok(),
            _ => false,
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
