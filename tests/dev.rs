//! `behest-agent dev` as a user runs it: the real binary, then `status` and `token` in the same
//! environment with no configuration at all. They find the dev agent on the default control socket
//! (inside a private `XDG_RUNTIME_DIR`), as they find a daemon.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::util::{exits_cleanly, signal};

/// The banner line that names the control socket.
const SOCKET_LINE: &str = "  Control socket           ";

/// The binary with nothing of the test process's environment but `PATH`; `HOME` and
/// `XDG_RUNTIME_DIR` are `runtime`, so the default control socket is inside it.
fn agent(runtime: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_behest-agent"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", runtime)
        .env("XDG_RUNTIME_DIR", runtime)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// Starts `dev` on free ports and returns it with its banner, which it prints once the token is
/// issued and every server listens.
async fn start_dev(runtime: &Path) -> (Child, String) {
    start_dev_with(runtime, &[]).await
}

/// [`start_dev`] with more arguments.
async fn start_dev_with(runtime: &Path, extra: &[&str]) -> (Child, String) {
    let mut dev = agent(
        runtime,
        &["dev", "--listen", "127.0.0.1:0", "--log-level", "warn"],
    );
    dev.args(extra);
    dev.stdout(Stdio::piped());
    let mut child = dev.spawn().expect("the binary runs");
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut banner = String::new();
    let read = async {
        while let Some(line) = lines.next_line().await.expect("readable stdout") {
            banner.push_str(&line);
            banner.push('\n');
            if line == "Ctrl-C stops it." {
                return true;
            }
        }
        false
    };
    let complete = tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("dev prints its banner within 60 s");
    assert!(complete, "dev exited before its banner ended:\n{banner}");
    // Keep reading, so a later line is not written into a closed pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, banner)
}

fn socket_in(banner: &str) -> &str {
    banner
        .lines()
        .find_map(|l| l.strip_prefix(SOCKET_LINE))
        .unwrap_or_else(|| panic!("no control socket in the banner:\n{banner}"))
}

fn succeeded(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("UTF-8 output")
}

#[tokio::test]
async fn status_token_and_doctor_find_a_running_dev_agent_with_no_configuration() {
    let runtime = tempfile::tempdir().unwrap();
    let default_socket = runtime.path().join("behest-agent.sock");
    let (mut dev, banner) = start_dev(runtime.path()).await;
    assert_eq!(
        socket_in(&banner),
        default_socket.display().to_string(),
        "{banner}"
    );
    assert!(
        !banner.contains("BEHEST_AGENT__CONTROL__SOCKET"),
        "no variable is needed to reach it:\n{banner}"
    );

    let status = agent(runtime.path(), &["status"]).output().await.unwrap();
    let status = succeeded("status", &status);
    let pid = dev.id().expect("dev is running");
    assert!(
        status.contains(&format!("daemon:       pid {pid},")),
        "status names the dev agent:\n{status}"
    );
    assert!(status.contains("client_id:    dev-client"), "{status}");

    let token = agent(runtime.path(), &["token"]).output().await.unwrap();
    let token = succeeded("token", &token);
    let token = token.trim();
    let header = jsonwebtoken::decode_header(token).expect("token prints a JWT");
    assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
    let claims: Value =
        jsonwebtoken::dangerous::insecure_decode_claims(token).expect("a JWT's claims");
    assert_eq!(claims["uid"], "dev-client");
    assert_eq!(claims["aud"], "https://api.behest.dev");

    // doctor, with no configuration of its own, checks the agent that answers.
    let doctor = agent(runtime.path(), &["doctor"]).output().await.unwrap();
    let doctor = succeeded("doctor", &doctor);
    assert!(
        doctor.contains(&format!("✓ daemon: pid {pid},")),
        "{doctor}"
    );
    assert!(doctor.contains("✓ uid: dev-client"), "{doctor}");
    assert!(
        doctor.contains("✓ upstream GET /v1/models through the agent"),
        "{doctor}"
    );
    assert!(!doctor.contains('✗'), "{doctor}");
    assert!(!doctor.contains(token), "doctor never prints the token");

    signal(&dev, nix::sys::signal::Signal::SIGTERM);
    exits_cleanly(&mut dev).await;
    assert!(
        !default_socket.exists(),
        "dev leaves no socket behind at the default path"
    );
}

#[tokio::test]
async fn dev_takes_a_private_control_socket_when_another_agent_answers_on_the_default() {
    let runtime = tempfile::tempdir().unwrap();
    let default_socket = runtime.path().join("behest-agent.sock");
    // Connections to it succeed (the kernel queues them), as to a running daemon.
    let _other_agent = tokio::net::UnixListener::bind(&default_socket).unwrap();

    let (mut dev, banner) = start_dev(runtime.path()).await;

    let socket = socket_in(&banner).to_owned();
    assert_ne!(socket, default_socket.display().to_string(), "{banner}");
    assert!(
        banner.contains(&format!(
            "not the default {}: another agent answers there",
            default_socket.display()
        )),
        "dev says why:\n{banner}"
    );
    let variable = format!("BEHEST_AGENT__CONTROL__SOCKET={socket} ");
    assert!(banner.contains(&variable), "and how to reach it:\n{banner}");
    let mut status = agent(runtime.path(), &["status"]);
    status.env("BEHEST_AGENT__CONTROL__SOCKET", &socket);
    let status = succeeded("status", &status.output().await.unwrap());
    let pid = dev.id().expect("dev is running");
    assert!(
        status.contains(&format!("daemon:       pid {pid},")),
        "{status}"
    );

    signal(&dev, nix::sys::signal::Signal::SIGTERM);
    exits_cleanly(&mut dev).await;
    assert!(
        default_socket.exists(),
        "the other agent's socket is left alone"
    );
}

/// The banner's proxy base URL.
fn base_in(banner: &str) -> &str {
    banner
        .lines()
        .find_map(|l| l.strip_prefix("  Proxy                    "))
        .unwrap_or_else(|| panic!("no proxy in the banner:\n{banner}"))
}

/// A chat completion through the dev proxy: its status.
async fn chat(url: &str, key: Option<&str>) -> u16 {
    let mut req = crate::proxy::http()
        .post(format!("{url}/chat/completions"))
        .json(&serde_json::json!({"model": "echo-1", "messages": [{"role": "user", "content": "hi"}]}));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn dev_applies_a_config_file_with_its_own_idp_and_upstream_and_refuses_an_unknown_key() {
    let runtime = tempfile::tempdir().unwrap();
    let cfg = runtime.path().join("cfg.toml");
    // The file's IdP, upstream and profiles give way to the embedded ones; its budget applies.
    std::fs::write(
        &cfg,
        "[auth]\ndomain = \"tenant.example.invalid\"\nclient_id = \"real\"\nclient_secret_file = \"/nonexistent/secret\"\n\
         [proxy]\nupstream = \"https://api.example.invalid\"\n\
         [profiles.other]\nclient_id = \"other\"\n\
         [budget]\nsession_requests = 1\n",
    )
    .unwrap();
    let cfg_s = cfg.display().to_string();
    let (mut dev, banner) = start_dev_with(runtime.path(), &["--config", &cfg_s]).await;
    let job = base_in(&banner).replace("/v1", "/s/job-1/v1");
    assert_eq!(chat(&job, None).await, 200);
    assert_eq!(chat(&job, None).await, 429, "the file's budget applies");
    let status = agent(runtime.path(), &["status", "--json"])
        .output()
        .await
        .unwrap();
    let status: Value = serde_json::from_str(&succeeded("status", &status)).unwrap();
    assert_eq!(status["daemon"]["config"], cfg_s.as_str(), "{status}");
    signal(&dev, nix::sys::signal::Signal::SIGTERM);
    exits_cleanly(&mut dev).await;

    // A typo is an error naming the key and the file, from --config or BEHEST_AGENT_CONFIG.
    std::fs::write(&cfg, "[budget]\nsesion_tokens = 5\n").unwrap();
    let by_flag = agent(
        runtime.path(),
        &[
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--check",
            "--config",
            &cfg_s,
        ],
    );
    let mut by_var = agent(
        runtime.path(),
        &["dev", "--listen", "127.0.0.1:0", "--check"],
    );
    by_var.env("BEHEST_AGENT_CONFIG", &cfg);
    for mut c in [by_flag, by_var] {
        let out = c.output().await.unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("sesion_tokens") && err.contains(&cfg_s),
            "{err}"
        );
    }
}

#[tokio::test]
async fn dev_names_listen_in_its_error_and_with_require_key_its_banner_says_a_key_is_needed() {
    let runtime = tempfile::tempdir().unwrap();
    let out = agent(runtime.path(), &["dev", "--listen", "0.0.0.0:0"])
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("value set by --listen"), "{err}");
    assert!(!err.contains("BEHEST_AGENT__PROXY__LISTEN"), "{err}");
    // A Unix socket alone is refused before anything starts; so is a token lifetime Auth0 would
    // never issue.
    let socket = runtime.path().join("dev.sock");
    for args in [
        ["--listen", &format!("unix:{}", socket.display())],
        ["--token-ttl", "999999h"],
    ] {
        let out = agent(runtime.path(), &[&["dev"][..], &args[..]].concat())
            .output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(!err.contains("token ready"), "{err}");
    }
    assert!(!socket.exists());

    let (mut dev, banner) =
        start_dev_with(runtime.path(), &["--set", "proxy.require_key=true"]).await;
    assert!(!banner.contains("OPENAI_API_KEY=placeholder"), "{banner}");
    assert!(banner.contains("key create"), "{banner}");
    let base = base_in(&banner);
    assert_eq!(chat(base, None).await, 401, "{banner}");
    // The key the banner says to make works.
    let key = agent(runtime.path(), &["key", "create", "--name", "dev"])
        .output()
        .await
        .unwrap();
    let key = succeeded("key create", &key);
    assert_eq!(chat(base, Some(key.trim())).await, 200);
    signal(&dev, nix::sys::signal::Signal::SIGTERM);
    exits_cleanly(&mut dev).await;
    // The key went with the run, not into the user's keys file; `--check` makes its own.
    let state = runtime.path().join(".local/state/behest-agent/keys.json");
    assert!(!state.exists(), "dev wrote {}", state.display());
    let out = agent(
        runtime.path(),
        &[
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--set",
            "proxy.require_key=true",
            "--check",
        ],
    )
    .output()
    .await
    .unwrap();
    succeeded("dev --check with require_key", &out);
    assert!(!state.exists(), "dev --check wrote {}", state.display());
}
