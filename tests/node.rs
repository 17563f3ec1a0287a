//! Node.js interop: installs `tests/interop` with `npm ci`, runs the real `oidc-provider` IdP and the real OpenAI SDK client.

// A helper module: not every test uses every helper.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long the IdP may take to print its endpoints (a cold `node` start on a busy CI machine).
const IDP_START_DEADLINE: Duration = Duration::from_secs(60);

/// `tests/interop`: the scripts, `package.json` and `package-lock.json`.
pub fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("interop")
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// npm writes `node_modules/.package-lock.json` last, so it is newer than the lockfile it installed.
fn npm_install_is_current(dir: &Path) -> bool {
    let installed = modified(&dir.join("node_modules").join(".package-lock.json"));
    let wanted = modified(&dir.join("package-lock.json"));
    matches!((installed, wanted), (Some(installed), Some(wanted)) if installed >= wanted)
}

/// Runs `npm ci` in `tests/interop` unless `node_modules` is already current. Safe to call from
/// every test: once per process (a `OnceLock`), and one process at a time (a lock file), since
/// `npm ci` deletes `node_modules` before installing.
pub fn ensure_npm_installed() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let dir = interop_dir();
        let lock_path = dir.join(".npm-ci.lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", lock_path.display()));
        lock.lock()
            .unwrap_or_else(|e| panic!("cannot lock {}: {e}", lock_path.display()));
        if npm_install_is_current(&dir) {
            return;
        }
        let output = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .output()
            .expect("cannot run `npm` (the interop tests need Node.js 20+ and npm on PATH)");
        assert!(
            output.status.success(),
            "`npm ci` in {} failed ({}):\n{}\n{}",
            dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout),
        );
        // `lock` is released when it is dropped here.
    });
}

/// Everything a child wrote to its stderr file so far.
fn read_all(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.seek(SeekFrom::Start(0));
    let _ = file.read_to_string(&mut text);
    text
}

/// A running `idp.mjs`: a real OAuth2 server that issues client-credentials JWT access tokens.
/// Dropping it kills the process; it also exits by itself when the test process dies (its stdin
/// closes).
pub struct OidcProvider {
    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub issuer: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
    /// Holds the piped stdin open; `kill_on_drop`.
    child: Child,
    /// The IdP's stderr (a temp file, so a chatty child never blocks on a full pipe).
    stderr: File,
}

impl OidcProvider {
    /// Starts `node idp.mjs '<options>'`; see `tests/interop/idp.mjs` for the options.
    pub async fn start(options: Value) -> OidcProvider {
        ensure_npm_installed();
        let mut stderr =
            tempfile::tempfile().expect("cannot create a temp file for idp.mjs's stderr");
        let mut child = Command::new("node")
            .arg("idp.mjs")
            .arg(options.to_string())
            .current_dir(interop_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(
                stderr
                    .try_clone()
                    .expect("cannot clone the stderr temp file"),
            )
            .kill_on_drop(true)
            .spawn()
            .expect("cannot run `node idp.mjs` (the interop tests need Node.js 20+ on PATH)");

        // The stdout pipe stays in `child`, open, after this one line is read.
        let stdout = child.stdout.as_mut().expect("idp.mjs stdout is piped");
        let mut line = String::new();
        let read = tokio::time::timeout(
            IDP_START_DEADLINE,
            BufReader::new(stdout).read_line(&mut line),
        )
        .await;
        let endpoints = match read {
            Ok(Ok(n)) if n > 0 => serde_json::from_str::<Value>(&line).ok(),
            _ => None,
        };
        let field = |name: &str| endpoints.as_ref()?.get(name)?.as_str().map(str::to_owned);
        let (Some(issuer), Some(token_endpoint), Some(jwks_uri)) =
            (field("issuer"), field("token_endpoint"), field("jwks_uri"))
        else {
            let _ = child.start_kill();
            let status = child.wait().await;
            panic!(
                "idp.mjs did not print its endpoints within {IDP_START_DEADLINE:?} (read {read:?}, line {line:?}, exit {status:?})\n--- idp.mjs stderr ---\n{}",
                read_all(&mut stderr)
            );
        };
        OidcProvider {
            issuer,
            token_endpoint,
            jwks_uri,
            child,
            stderr,
        }
    }

    /// What the IdP logged: warnings, and one `grant.error` line per refused token request with
    /// the reason its response hides (e.g. a client assertion's wrong `aud`).
    pub fn stderr(&mut self) -> String {
        read_all(&mut self.stderr)
    }

    /// Kills the IdP and waits for it: for tests of an agent whose IdP went away.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Runs the real OpenAI SDK (`openai-client.mjs`) against `base_url` for one scenario (`chat`,
/// `stream`, `embeddings`, `upload`, `models`) and returns its JSON line: `{"ok": true, ...}` or
/// `{"ok": false, "status", "error"}`. `OPENAI_API_KEY` is `placeholder` unless `extra_env` sets it.
pub async fn openai_client(base_url: &str, scenario: &str, extra_env: &[(&str, &str)]) -> Value {
    ensure_npm_installed();
    let output = Command::new("node")
        .arg("openai-client.mjs")
        .arg(base_url)
        .arg(scenario)
        .current_dir(interop_dir())
        // The SDK turns these into headers; a developer's shell must not change what is sent.
        .env_remove("OPENAI_ORG_ID")
        .env_remove("OPENAI_PROJECT_ID")
        .env("OPENAI_API_KEY", "placeholder")
        .envs(extra_env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("cannot run `node openai-client.mjs` (the interop tests need Node.js 20+ on PATH)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str::<Value>(line).ok())
        .unwrap_or_else(|| {
            panic!(
                "openai-client.mjs {base_url} {scenario} printed no JSON line ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
        })
}
