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
    let mut dev = agent(
        runtime,
        &["dev", "--listen", "127.0.0.1:0", "--log-level", "warn"],
    );
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
