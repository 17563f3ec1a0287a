//! CI integration on the real binary: `wait` (ready, timeout with the reason), `stop` (in-flight
//! requests finish, then the daemon is gone; nothing to stop), and the session `env` and `exec`
//! take from a CI job's variables. The GitHub Action and the GitLab template have their own
//! modules (`ci_github`, `ci_gitlab`).

use std::process::Stdio;
use std::time::Duration;

use devkit::idp::Fault;

use devkit::upstream::{BearerKind, Upstream, UpstreamFault, UpstreamOptions};
use tokio::process::{Child, Command};

use crate::util::{
    AUDIENCE, Harness, Start, assert_no_secret_in, eventually, exits_cleanly, signal,
};
pub use crate::util::{Out, output};

/// Whether process `pid` has exited: gone from /proc, or a zombie nobody has reaped yet.
pub fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat[stat.rfind(')').unwrap() + 1..].trim_start();
            state.starts_with('Z') || state.starts_with('X')
        }
        Err(_) => true,
    }
}

/// A plain-http client that ignores the machine's proxy settings.
pub fn http() -> reqwest::Client {
    behest_agent::tls::install_default_provider();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A chat completion request body.
pub fn chat(content: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "echo-1",
        "stream": stream,
        "messages": [{"role": "user", "content": content}],
    })
}

/// A daemon of `h` in front of an echo upstream that checks its tokens, its proxy on a free port.
async fn daemon(
    h: &Harness,
    extra: &[(&str, &str)],
) -> (Upstream, tokio_util::sync::DropGuard, Child) {
    let (upstream, guard) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
        .await
        .unwrap();
    let mut env = vec![("BEHEST_AGENT__PROXY__LISTEN", "127.0.0.1:0")];
    env.extend_from_slice(extra);
    let child = h
        .agent_with_upstream(&upstream.base_url(), &["run"], &env)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (upstream, guard, child)
}

/// The base URL `env` gives for the harness's daemon.
async fn base_url(h: &Harness) -> String {
    let o = output(h.agent(&["env", "--format", "dotenv"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    o.stdout
        .lines()
        .find_map(|l| l.strip_prefix("OPENAI_BASE_URL="))
        .expect("env prints OPENAI_BASE_URL")
        .trim_matches(['\'', '"'])
        .to_string()
}

#[tokio::test]
async fn env_and_exec_refuse_a_daemon_whose_proxy_listens_on_a_unix_socket_only_or_nowhere() {
    let h = Harness::start().await;
    let listen = format!("unix:{}", h.path("proxy.sock").display());
    let (_upstream, _g, mut child) = daemon(&h, &[("BEHEST_AGENT__PROXY__LISTEN", &listen)]).await;
    let o = output(h.agent(&["wait", "--timeout", "60s"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    // The configuration names a TCP address: not the daemon's, so not to be printed.
    let elsewhere = [("BEHEST_AGENT__PROXY__LISTEN", "127.0.0.1:9")];
    for args in [&["env"][..], &["exec", "--", "true"]] {
        let o = output(h.agent(args, &elsewhere)).await;
        assert_eq!(o.code, 1, "{args:?}: {}", o.stdout);
        assert!(
            o.stderr.contains("listens only on unix:"),
            "{args:?}: {}",
            o.stderr
        );
        assert!(!o.stdout.contains("127.0.0.1:9"), "{args:?}: {}", o.stdout);
    }
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    exits_cleanly(&mut child).await;

    // A daemon with no upstream serves no proxy at all.
    let h = Harness::start().await;
    let mut child = h
        .agent(&["run"], &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let o = output(h.agent(&["wait", "--timeout", "60s"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = output(h.agent(&["env"], &[])).await;
    assert_eq!(o.code, 1, "{}", o.stdout);
    assert!(o.stderr.contains("serves no proxy"), "{}", o.stderr);
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    exits_cleanly(&mut child).await;
}

#[tokio::test]
async fn exec_gives_the_command_its_config_path_absolute() {
    let h = Harness::start().await;
    let (_upstream, _g, mut child) = daemon(&h, &[]).await;
    let o = output(h.agent(&["wait", "--timeout", "60s"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    std::fs::write(h.path("cfg.toml"), "[proxy]\n").unwrap();
    let script = "cd / && printenv BEHEST_AGENT_CONFIG";
    let mut exec = h.agent(
        &["exec", "--config", "cfg.toml", "--", "sh", "-c", script],
        &[],
    );
    exec.current_dir(h.dir.path());
    let o = output(exec).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout.trim(), h.path("cfg.toml").to_str().unwrap());
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    exits_cleanly(&mut child).await;
}

#[tokio::test]
async fn wait_without_a_daemon_fails_at_its_timeout_naming_the_socket() {
    let h = Harness::start().await;
    let o = output(h.agent(&["wait", "--timeout", "1s"], &[])).await;
    assert_eq!(o.code, 1, "{}", o.stderr);
    let socket = h.path("run/agent.sock");
    assert!(
        o.stderr.contains("not ready within 1s")
            && o.stderr.contains("no daemon answers on")
            && o.stderr.contains(socket.to_str().unwrap()),
        "{}",
        o.stderr
    );
}

#[tokio::test]
async fn wait_returns_once_the_daemon_holds_a_token_and_stop_ends_it() {
    let h = Harness::start().await;
    let mut child = h
        .agent(&["run"], &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let o = output(h.agent(&["wait", "--timeout", "60s"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    // Ready means a token is held: the daemon has made its grant, and `token` gets it from it.
    assert_eq!(h.idp.grants(), 1);
    let o = output(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(h.idp.grants(), 1, "the token came from the daemon");

    let pid = child.id().unwrap();
    let o = output(h.agent(&["stop"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.contains(&format!("pid {pid}")) && o.stdout.contains("stopped"),
        "{}",
        o.stdout
    );
    // `stop` returned once the process had exited (a zombie until this test reaps it).
    assert!(exited(pid), "the daemon still runs after stop returned");
    exits_cleanly(&mut child).await;
    assert!(!h.path("run/agent.sock").exists());

    let o = output(h.agent(&["stop"], &[])).await;
    assert_eq!(o.code, 1, "{}", o.stdout);
    assert!(o.stderr.contains("nothing to stop"), "{}", o.stderr);
}

#[tokio::test]
async fn wait_gives_the_grants_last_error_at_its_timeout_or_at_once_when_only_a_fix_helps() {
    let h = Harness::start().await;
    // An outage: the daemon may still get a token, so wait waits, then says why not.
    h.idp
        .set_fault(Some(Fault::Unavailable { retry_after: None }));
    let mut child = h
        .agent(&["run"], &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let o = output(h.agent(&["wait", "--timeout", "3s"], &[])).await;
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("not ready within 3s")
            && o.stderr.contains("holds no valid token")
            && o.stderr.contains("503"),
        "{}",
        o.stderr
    );
    let o = output(h.agent(&["stop"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    exits_cleanly(&mut child).await;

    // A wrong secret: retrying will not help, so wait says so at once, long before its timeout.
    h.idp.set_fault(None);
    std::fs::write(h.path("client-secret"), "wrong-secret-for-wait\n").unwrap();
    let mut child = h
        .agent(&["run"], &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let o = tokio::time::timeout(
        Duration::from_secs(60),
        output(h.agent(&["wait", "--timeout", "1h"], &[])),
    )
    .await
    .expect("wait ends at once on a refused client, not at its timeout");
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("will keep failing") && o.stderr.contains("invalid_client"),
        "{}",
        o.stderr
    );
    assert_no_secret_in(
        &o.stderr,
        &[h.secret.clone(), "wrong-secret-for-wait".to_string()],
        "wait's stderr",
    );
    let o = output(h.agent(&["stop"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    exits_cleanly(&mut child).await;
}

#[tokio::test]
async fn stop_lets_a_stream_in_flight_finish_before_the_daemon_exits() {
    let h = Harness::start().await;
    let (upstream, _g, mut child) =
        daemon(&h, &[("BEHEST_AGENT__PROXY__SHUTDOWN_GRACE", "5m")]).await;
    let o = output(h.agent(&["wait", "--timeout", "60s"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let base = base_url(&h).await;

    // A stream that sends one event, then waits to be let go on.
    upstream.fail_next(1, UpstreamFault::PauseStream { after_events: 1 });
    let mut resp = http()
        .post(format!("{base}/chat/completions"))
        .json(&chat("finish me", true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut seen = Vec::new();
    while !seen.windows(2).any(|w| w == b"\n\n") {
        let chunk = resp.chunk().await.unwrap().expect("the first event");
        seen.extend_from_slice(&chunk);
    }

    let mut stop = h
        .agent(&["stop", "--timeout", "5m"], &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The daemon is stopping: its control socket takes no new connection…
    let socket = h.path("run/agent.sock");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::UnixStream::connect(&socket).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the daemon still accepts control connections after stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // …but the stream it is serving keeps it running, and `stop` waiting.
    assert!(
        child.try_wait().unwrap().is_none(),
        "the daemon exited mid-stream"
    );
    assert!(
        stop.try_wait().unwrap().is_none(),
        "stop returned mid-stream"
    );

    upstream.resume_stream();
    while !seen.ends_with(b"data: [DONE]\n\n") {
        match resp.chunk().await.expect("the stream ends cleanly") {
            Some(chunk) => seen.extend_from_slice(&chunk),
            None => panic!("the stream ended early: {}", String::from_utf8_lossy(&seen)),
        }
    }
    assert!(String::from_utf8_lossy(&seen).contains("finish"));
    let out = tokio::time::timeout(Duration::from_secs(60), stop.wait_with_output())
        .await
        .expect("stop returns once the stream is over")
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exits_cleanly(&mut child).await;
    let r = upstream.requests();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].bearer, BearerKind::Jwt);
}

/// `env --format dotenv`'s base URL with `vars` set, no daemon, no configuration.
async fn env_base_url(vars: &[(&str, &str)], args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_behest-agent"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir.path())
        .env("XDG_RUNTIME_DIR", dir.path())
        .envs(vars.iter().copied())
        .args(["env", "--format", "dotenv"])
        .args(args)
        .stdin(Stdio::null());
    let o = output(c).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    o.stdout
        .lines()
        .find_map(|l| l.strip_prefix("OPENAI_BASE_URL="))
        .expect("OPENAI_BASE_URL")
        .trim_matches(['\'', '"'])
        .to_string()
}

#[tokio::test]
async fn env_takes_the_session_from_the_ci_jobs_variables_unless_told_otherwise() {
    let github = [
        ("GITHUB_RUN_ID", "555"),
        ("GITHUB_RUN_ATTEMPT", "2"),
        ("GITHUB_JOB", "lint"),
        ("CI_JOB_ID", "9"),
    ];
    assert_eq!(
        env_base_url(&github, &[]).await,
        "http://127.0.0.1:8711/s/gh-555-2-lint/v1"
    );
    assert_eq!(
        env_base_url(&[("BUILD_TAG", "jenkins-team/app-12")], &[]).await,
        "http://127.0.0.1:8711/s/jk-jenkins-team-app-12/v1"
    );
    assert_eq!(
        env_base_url(&github, &["--session", "mine"]).await,
        "http://127.0.0.1:8711/s/mine/v1"
    );
    let mut off = github.to_vec();
    off.push(("BEHEST_AGENT__PROXY__SESSION_FROM_CI", "false"));
    assert_eq!(env_base_url(&off, &[]).await, "http://127.0.0.1:8711/v1");
    // A configured session is sent by the proxy itself: the URL carries none.
    let mut configured = github.to_vec();
    configured.push(("BEHEST_AGENT__PROXY__SESSION_ID", "team-a"));
    assert_eq!(
        env_base_url(&configured, &[]).await,
        "http://127.0.0.1:8711/v1"
    );
    assert_eq!(env_base_url(&[], &[]).await, "http://127.0.0.1:8711/v1");
}

#[tokio::test]
async fn exec_takes_the_session_from_the_ci_jobs_variables() {
    let h = Harness::start().await;
    let (upstream, _g) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
        .await
        .unwrap();
    // No daemon: exec serves its own proxy; the command prints the base URL it was given.
    let o = output(h.agent_with_upstream(
        &upstream.base_url(),
        &["exec", "--", "sh", "-c", "printf %s \"$OPENAI_BASE_URL\""],
        &[("CI_JOB_ID", "31337")],
    ))
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.starts_with("http://127.0.0.1:") && o.stdout.ends_with("/s/gl-31337/v1"),
        "{}",
        o.stdout
    );
}

#[tokio::test]
async fn exec_passes_bytes_that_are_not_utf8_through_and_keeps_the_status_when_stderr_is_gone() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let h = Harness::start().await;
    let (upstream, _g) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
        .await
        .unwrap();
    // A CI job inherits any bytes: a Latin-1 variable of someone else's, a Latin-1 argument.
    let mut c = h.agent_with_upstream(
        &upstream.base_url(),
        &["exec", "--", "sh", "-c", "printf %s \"$1\"; exit 7", "sh"],
        &[],
    );
    c.env("LATIN1_MESSAGE", OsStr::from_bytes(b"caf\xe9"))
        .arg(OsStr::from_bytes(b"x\xffy"));
    let o = output(c).await;
    assert_eq!(o.code, 7, "{}", o.stderr);
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    assert_eq!(
        o.stdout, "x\u{fffd}y",
        "the argument reaches the command as it was"
    );
    // The usage line cannot be written (stderr full): the command's status is still exec's.
    let mut c = h.agent_with_upstream(
        &upstream.base_url(),
        &["exec", "--", "sh", "-c", "exit 7"],
        &[],
    );
    c.stderr(
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap(),
    );
    c.stdout(std::process::Stdio::null());
    let status = tokio::time::timeout(Duration::from_secs(120), c.status()).await;
    assert_eq!(status.unwrap().unwrap().code(), Some(7));
}

#[tokio::test]
async fn behind_a_company_proxy_exec_keeps_the_jobs_requests_to_the_agent_off_it() {
    let h = Harness::start().await;
    let (upstream, _g) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
        .await
        .unwrap();
    // The runner routes http through a proxy (that no loopback listener is): the job's curl to
    // OPENAI_BASE_URL must not go there.
    let o = output(h.agent_with_upstream(
        &upstream.base_url(),
        &[
            "exec",
            "--no-summary",
            "--",
            "sh",
            "-c",
            "printf '%s|%s|' \"$NO_PROXY\" \"$no_proxy\"; curl -sf -o /dev/null -w '%{http_code}' \"$OPENAI_BASE_URL/models\"",
        ],
        &[
            ("http_proxy", "http://127.0.0.1:9"),
            ("NO_PROXY", "corp.example, 127.0.0.0/8"),
        ],
    ))
    .await;
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert_eq!(
        o.stdout, "corp.example,127.0.0.0/8,127.0.0.1|corp.example,127.0.0.0/8,127.0.0.1|200",
        "{}",
        o.stderr
    );
}

#[tokio::test]
async fn wait_and_stop_have_help() {
    for cmd in ["wait", "stop"] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_behest-agent"));
        c.args([cmd, "--help"]).stdin(Stdio::null());
        let o = output(c).await;
        assert_eq!(o.code, 0, "{}", o.stderr);
        assert!(o.stdout.contains("--timeout"), "{}", o.stdout);
    }
}

/// Polls until `pid` has exited.
pub async fn until_exited(pid: u32) {
    eventually(Duration::from_secs(30), "the daemon to exit", || {
        exited(pid)
    })
    .await;
}

#[tokio::test]
async fn env_with_a_config_file_that_cannot_be_read_says_so_and_guesses_no_daemon() {
    let h = Harness::start().await;
    // A daemon on the default socket of a runtime directory; a client whose --config cannot be
    // read (a directory) is told so, and is not pointed at whatever daemon the default socket
    // finds: the file it names may name another socket.
    let runtime = h.path("xdg");
    std::fs::create_dir(&runtime).unwrap();
    let socket = runtime.join("behest-agent.sock");
    let socket = socket.to_str().unwrap();
    let (_upstream, _g, mut child) = daemon(&h, &[("BEHEST_AGENT__CONTROL__SOCKET", socket)]).await;
    let o = output(h.agent(&["wait"], &[("BEHEST_AGENT__CONTROL__SOCKET", socket)])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let mut c = Command::new(env!("CARGO_BIN_EXE_behest-agent"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("XDG_RUNTIME_DIR", &runtime)
        .env("CI_JOB_ID", "8")
        .args(["env", "--format", "dotenv", "--config"])
        .arg(h.dir.path())
        .stdin(Stdio::null());
    let o = output(c).await;
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stdout.is_empty(), "{}", o.stdout);
    assert!(
        o.stderr.contains(&h.dir.path().display().to_string()),
        "{}",
        o.stderr
    );
    let o = output(h.agent(&["stop"], &[("BEHEST_AGENT__CONTROL__SOCKET", socket)])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    exits_cleanly(&mut child).await;
}
