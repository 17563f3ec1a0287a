//! The assembled agent end to end: the real OpenAI SDK (npm `openai`) through the daemon's proxy
//! (`App`) to the echo upstream that verifies tokens like Behest, with the embedded IdP or the real
//! `oidc-provider`; single-flight under 1,000 requests; and the binary: `exec`, `env`, and a
//! graceful SIGTERM during a stream. The proxy's own behaviour, through its API, is `forwarding`'s.

use std::process::Stdio;
use std::time::Duration;

use behest_agent::app::App;
use behest_agent::clock;
use behest_agent::config::{self, ListenAddr, LoadOptions};
use devkit::upstream::{BearerKind, Keys, Upstream, UpstreamOptions};
use serde_json::json;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::node::{OidcProvider, openai_client};
use crate::util::{AUDIENCE, Harness, Start, assert_no_secret_in, eventually};

/// IdP + echo upstream + the agent, in this process.
pub struct Stack {
    pub h: Harness,
    pub upstream: Upstream,
    _upstream_stop: DropGuard,
    pub base: String,
    pub stop: CancellationToken,
    app: tokio::task::JoinHandle<()>,
    pub tokens: behest_agent::token::TokenSource,
    pub metrics: std::sync::Arc<behest_agent::telemetry::Metrics>,
    pub accounting: std::sync::Arc<behest_agent::usage::Accounting>,
}

pub async fn stack_with(edit: impl FnOnce(&mut UpstreamOptions), extra: &[(&str, &str)]) -> Stack {
    let h = Harness::start().await;
    let mut opts = UpstreamOptions::for_idp(&h.idp, AUDIENCE);
    edit(&mut opts);
    let (upstream, upstream_stop) = Upstream::start(opts).await.unwrap();
    let up = upstream.base_url();
    let mut env = vec![
        ("BEHEST_AGENT__PROXY__LISTEN", "127.0.0.1:0"),
        ("BEHEST_AGENT__PROXY__UPSTREAM", up.as_str()),
        ("BEHEST_AGENT__PROXY__ALLOW_INSECURE_UPSTREAM", "true"),
    ];
    env.extend_from_slice(extra);
    // The binary tests start their own daemon on the harness's default socket.
    let socket = h.path("stack/agent.sock").display().to_string();
    env.push(("BEHEST_AGENT__CONTROL__SOCKET", socket.as_str()));
    let app = App::build(h.settings(&env), clock::system())
        .await
        .expect("the agent starts");
    let addr = match app.proxy_addresses()[0] {
        ListenAddr::Tcp(a) => a,
        _ => unreachable!(),
    };
    let tokens = app.tokens();
    let metrics = app.metrics();
    let accounting = app.accounting();
    let stop = CancellationToken::new();
    let task = tokio::spawn(app.run(stop.clone()));
    Stack {
        metrics,
        accounting,
        h,
        upstream,
        _upstream_stop: upstream_stop,
        base: format!("http://{addr}/v1"),
        stop,
        app: task,
        tokens,
    }
}

pub async fn stack() -> Stack {
    stack_with(|_| {}, &[]).await
}

impl Stack {
    pub async fn finish(self) {
        self.stop.cancel();
        self.app.await.unwrap();
        if let Some(t) = self.tokens.current() {
            use secrecy::ExposeSecret;
            self.h.remember(t.secret().expose_secret());
        }
        self.h.assert_no_secrets_logged();
    }

    /// Every request the upstream saw carried a verified JWT for this client, never the placeholder.
    fn assert_upstream_saw_only_the_agents_token(&self) {
        let reqs = self.upstream.requests();
        assert!(!reqs.is_empty());
        for r in reqs {
            assert_eq!(r.bearer, BearerKind::Jwt, "{} {}", r.method, r.path);
            let claims = r.claims.expect("the upstream verified the bearer");
            assert_eq!(claims["uid"], self.h.client_id.as_str());
        }
    }
}

pub fn http() -> reqwest::Client {
    behest_agent::tls::install_default_provider();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

#[tokio::test]
async fn the_openai_sdk_works_unchanged_through_the_proxy() {
    let s = stack().await;
    let chat = openai_client(&s.base, "chat", &[]).await;
    assert_eq!(chat["ok"], true, "{chat}");
    assert_eq!(chat["content"], "hello");
    let stream = openai_client(&s.base, "stream", &[]).await;
    assert_eq!(stream["ok"], true, "{stream}");
    assert_eq!(stream["finish_reason"], "stop");
    let emb = openai_client(&s.base, "embeddings", &[]).await;
    assert_eq!(emb["ok"], true, "{emb}");
    let models = openai_client(&s.base, "models", &[]).await;
    assert_eq!(models["ok"], true, "{models}");
    let up = openai_client(&s.base, "upload", &[]).await;
    assert_eq!(up["ok"], true, "{up}");
    s.assert_upstream_saw_only_the_agents_token();
    s.finish().await;
}

#[tokio::test]
async fn thousand_concurrent_proxied_requests_on_an_empty_cache_make_one_grant() {
    let s = stack().await;
    let client = http();
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let (c, url) = (client.clone(), format!("{}/models?i={i}", s.base));
        tasks.push(tokio::spawn(async move {
            c.get(url).send().await.map(|r| r.status().as_u16())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().expect("request completes"), 200);
    }
    assert_eq!(s.h.idp.grants(), 1);
    assert_eq!(s.upstream.request_count(), 1000);
    s.finish().await;
}

#[tokio::test]
async fn the_openai_sdk_works_with_the_real_oidc_provider_as_idp() {
    crate::util::capture_logs();
    let secret = format!("op-{}", crate::util::random(30));
    let resource = "https://behest.test/api";
    let op = OidcProvider::start(json!({
        "audience": resource, "ttl": 300,
        "clients": [{"client_id": "ci-proxy", "client_secret": secret, "auth": "client_secret_basic"}],
    }))
    .await;
    let (upstream, _guard) = Upstream::start(UpstreamOptions {
        keys: Some(Keys::Jwks(op.jwks_uri.parse().unwrap())),
        issuer: Some(op.issuer.clone()),
        ..UpstreamOptions::new(resource)
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), &secret).unwrap();
    let secret_file = dir.path().join("secret").display().to_string();
    let socket = dir.path().join("agent.sock").display().to_string();
    let up = upstream.base_url();
    let env = [
        ("BEHEST_AGENT__AUTH__ISSUER", op.issuer.as_str()),
        ("BEHEST_AGENT__AUTH__CLIENT_ID", "ci-proxy"),
        ("BEHEST_AGENT__AUTH__CLIENT_AUTH", "client_secret_basic"),
        ("BEHEST_AGENT__AUTH__RESOURCE", resource),
        (
            "BEHEST_AGENT__AUTH__CLIENT_SECRET_FILE",
            secret_file.as_str(),
        ),
        ("BEHEST_AGENT__TOKEN__CACHE_FILE", ""),
        ("BEHEST_AGENT__CONTROL__SOCKET", socket.as_str()),
        ("BEHEST_AGENT__PROXY__LISTEN", "127.0.0.1:0"),
        ("BEHEST_AGENT__PROXY__UPSTREAM", up.as_str()),
        ("BEHEST_AGENT__PROXY__ALLOW_INSECURE_UPSTREAM", "true"),
    ];
    let mut env: std::collections::HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.insert("BEHEST_AGENT__AUTH__PROVIDER".into(), "oidc".into());
    let settings = config::load(&LoadOptions {
        path: None,
        default_path: None,
        env,
        overrides: vec![],
    })
    .unwrap();
    let app = App::build(settings, clock::system()).await.unwrap();
    let ListenAddr::Tcp(addr) = app.proxy_addresses()[0] else {
        unreachable!()
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(app.run(stop.clone()));
    let base = format!("http://{addr}/v1");
    let out = openai_client(&base, "chat", &[]).await;
    assert_eq!(out["ok"], true, "{out}");
    let out = openai_client(&base, "stream", &[]).await;
    assert_eq!(out["ok"], true, "{out}");
    for r in upstream.requests() {
        assert_eq!(r.bearer, BearerKind::Jwt);
        assert_eq!(r.claims.unwrap()["uid"], "ci-proxy");
    }
    stop.cancel();
    task.await.unwrap();
    assert_no_secret_in(&crate::util::logs(), &[secret], "the agent's logs");
}

// ---- the binary: exec, env, SIGTERM during a stream

fn openai_script() -> String {
    crate::node::ensure_npm_installed();
    crate::node::interop_dir()
        .join("openai-client.mjs")
        .display()
        .to_string()
}

#[tokio::test]
async fn exec_without_a_daemon_serves_its_own_proxy_and_passes_the_exit_status() {
    let s = stack().await;
    let script = format!(
        "node {} \"$OPENAI_BASE_URL\" chat && exit 7",
        openai_script()
    );
    let out =
        s.h.agent_with_upstream(
            &s.upstream.base_url(),
            &["exec", "--", "sh", "-c", &script],
            &[],
        )
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"ok\":true"), "{stdout}");
    assert_no_secret_in(
        &String::from_utf8_lossy(&out.stderr),
        std::slice::from_ref(&s.h.secret),
        "exec's stderr",
    );
    s.finish().await;
}

/// A grant only a configuration change fixes (a wrong secret) fails `exec` before the command
/// runs, as the Action and the GitLab template fail; an IdP that cannot be reached does not
/// (the proxy retries while the command runs).
#[tokio::test]
async fn exec_without_a_daemon_does_not_run_the_command_with_a_wrong_secret() {
    let s = stack().await;
    std::fs::write(s.h.path("client-secret"), "wrong-secret-value\n").unwrap();
    let ran = s.h.path("ran");
    let out =
        s.h.agent_with_upstream(
            &s.upstream.base_url(),
            &["exec", "--", "touch", ran.to_str().unwrap()],
            &[],
        )
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("invalid_client"), "{stderr}");
    assert!(!ran.exists(), "the command ran");

    // The command's profile is what counts: a good one runs beside a wrong default, and a wrong
    // one does not run beside a good default.
    let good = s.h.path("good-secret");
    std::fs::write(&good, format!("{}\n", s.h.secret)).unwrap();
    crate::util::set_mode(&good, 0o600);
    let wrong = s.h.path("client-secret").display().to_string();
    let good = good.display().to_string();
    for (default, profile, runs) in [(&wrong, &good, true), (&good, &wrong, false)] {
        let _ = std::fs::remove_file(&ran);
        let out =
            s.h.agent_with_upstream(
                &s.upstream.base_url(),
                &[
                    "exec",
                    "--profile",
                    "team_b",
                    "--",
                    "touch",
                    ran.to_str().unwrap(),
                ],
                &[
                    ("BEHEST_AGENT__AUTH__CLIENT_SECRET_FILE", default.as_str()),
                    (
                        "BEHEST_AGENT__PROFILES__TEAM_B__CLIENT_SECRET_FILE",
                        profile.as_str(),
                    ),
                ],
            )
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(if runs { 0 } else { 1 }),
            "{stderr}"
        );
        assert_eq!(ran.exists(), runs, "{stderr}");
    }
    let _ = std::fs::remove_file(&ran);

    s.h.stop_idp().await;
    let out =
        s.h.agent_with_upstream(
            &s.upstream.base_url(),
            &["exec", "--", "touch", ran.to_str().unwrap()],
            &[],
        )
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(ran.exists(), "the command ran while the IdP was down");
    s.finish().await;
}

#[tokio::test]
async fn key_create_says_when_the_daemon_asks_for_no_key() {
    let s = stack().await;
    let o = crate::util::output(s.h.agent(&["key", "create"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr.contains("proxy.require_key is off"),
        "{}",
        o.stderr
    );
    s.finish().await;
}

#[tokio::test]
async fn exec_exits_127_for_a_missing_command_and_126_for_one_it_cannot_run() {
    let s = stack().await;
    let not_executable = s.h.path("not-executable");
    std::fs::write(&not_executable, "#!/bin/sh\nexit 0\n").unwrap();
    for (command, code, says) in [
        (
            s.h.path("no-such-command").display().to_string(),
            127,
            "no such file",
        ),
        (
            "no-such-command-on-the-path".to_string(),
            127,
            "not found on PATH",
        ),
        (
            not_executable.display().to_string(),
            126,
            "Permission denied",
        ),
    ] {
        let out =
            s.h.agent_with_upstream(&s.upstream.base_url(), &["exec", "--", &command], &[])
                .output()
                .await
                .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{command}: {stderr}");
        assert!(
            stderr.contains(&command) && stderr.contains(says),
            "{stderr}"
        );
    }
    s.finish().await;
}

/// Whether a process with this pid exists (a zombie counts until reaped).
fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

#[tokio::test]
async fn exec_runs_the_command_in_its_own_group_and_ends_what_it_leaves_behind() {
    let s = stack().await;
    let pid_file = s.h.path("grandchild.pid");
    // A grandchild that would outlive the command (and lose its proxy); the command's process group.
    let script = format!(
        "sleep 300 & echo $! > {}; ps -o pgid= -p $$",
        pid_file.display()
    );
    let exec =
        s.h.agent_with_upstream(
            &s.upstream.base_url(),
            &["exec", "--", "sh", "-c", &script],
            &[],
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let exec_pid = exec.id().unwrap() as i32;
    let out = exec.wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(0));
    let group: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_ne!(
        nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(std::process::id() as i32)))
            .unwrap()
            .as_raw(),
        group,
        "the command runs in a group of its own, not in its caller's (which a terminal's Ctrl-C reaches)"
    );
    assert_ne!(group, exec_pid);
    let grandchild: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eventually(Duration::from_secs(10), "the grandchild is ended", || {
        !alive(grandchild)
    })
    .await;
    s.finish().await;
}

#[tokio::test]
async fn exec_and_env_use_the_running_daemon_with_a_session() {
    let s = stack().await;
    let mut daemon =
        s.h.agent_with_upstream(
            &s.upstream.base_url(),
            &["run"],
            &[("BEHEST_AGENT__PROXY__LISTEN", "127.0.0.1:0")],
        )
        .spawn()
        .unwrap();
    let socket = s.h.path("run/agent.sock");
    eventually(Duration::from_secs(30), "the daemon's socket", || {
        socket.exists()
    })
    .await;
    let out =
        s.h.agent_with_upstream(
            &s.upstream.base_url(),
            &["env", "--format", "dotenv", "--session", "job-9"],
            &[],
        )
        .output()
        .await
        .unwrap();
    let env_out = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        env_out.contains("/s/job-9/v1") && env_out.contains("OPENAI_API_KEY=placeholder"),
        "{env_out}"
    );
    let base = env_out
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("OPENAI_BASE_URL=")
        .to_string();
    assert!(!base.contains(":0/"), "the daemon's real port: {base}");
    let script = format!(
        "node {} \"$OPENAI_BASE_URL\" models; echo \"$OPENAI_BASE_URL\"; exit 3",
        openai_script()
    );
    let out =
        s.h.agent_with_upstream(
            &s.upstream.base_url(),
            &["exec", "--session", "job-9", "--", "sh", "-c", &script],
            &[],
        )
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(
        stdout.contains("\"ok\":true") && stdout.contains(&base),
        "{stdout}"
    );
    let session = s
        .upstream
        .requests()
        .into_iter()
        .rev()
        .find_map(|r| r.session_id);
    assert_eq!(session.as_deref(), Some("job-9"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(daemon.wait().await.unwrap().code(), Some(0));
    s.finish().await;
}

#[tokio::test]
async fn sigterm_during_a_stream_lets_it_finish_then_exits_0() {
    let s = stack_with(|o| o.sse_interval = Duration::from_millis(150), &[]).await;
    let mut daemon =
        s.h.agent_with_upstream(
            &s.upstream.base_url(),
            &["run"],
            &[("BEHEST_AGENT__PROXY__LISTEN", "127.0.0.1:0")],
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let socket = s.h.path("run/agent.sock");
    eventually(Duration::from_secs(30), "the daemon's socket", || {
        socket.exists()
    })
    .await;
    let out =
        s.h.agent_with_upstream(&s.upstream.base_url(), &["env", "--format", "dotenv"], &[])
            .output()
            .await
            .unwrap();
    let base = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("OPENAI_BASE_URL=")
        .to_string();
    let mut resp = http()
        .post(format!("{base}/chat/completions"))
        .header("x-echo-events", "10")
        .json(&json!({"model": "echo-1", "stream": true, "messages": [{"role": "user", "content": "long"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().expect("a first event");
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut rest = Vec::new();
    while let Some(c) = resp.chunk().await.expect("the stream is not cut") {
        rest.extend_from_slice(&c);
    }
    assert!(
        String::from_utf8_lossy(&rest).contains("data: [DONE]"),
        "the stream finished"
    );
    let status = tokio::time::timeout(Duration::from_secs(30), daemon.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    s.finish().await;
}

#[tokio::test]
async fn run_refuses_a_non_loopback_listen_address_without_allow_remote() {
    let s = stack().await;
    let out =
        s.h.agent_with_upstream(
            &s.upstream.base_url(),
            &["run"],
            &[("BEHEST_AGENT__PROXY__LISTEN", "0.0.0.0:0")],
        )
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("proxy.listen") && err.contains("allow_remote"),
        "{err}"
    );
    s.finish().await;
}
