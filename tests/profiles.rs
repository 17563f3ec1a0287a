//! Profiles (SPEC §9): several identities on one agent. A devkit IdP with two clients, the echo
//! upstream that records each request's verified claims, and the agent with `[profiles.team-b]`:
//! `/p/team-b/…` carries team-b's token, everything else the default's; the CLI's `--profile`;
//! reloads that add and remove profiles while the others keep serving; one grant per profile.

use std::path::PathBuf;
use std::time::Duration;

use behest_agent::app::{App, Reload};
use behest_agent::clock;
use behest_agent::config::{self, ListenAddr, LoadOptions, Settings};
use behest_agent::control::Daemon;
use devkit::upstream::{Upstream, UpstreamFault, UpstreamOptions};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::node::openai_client;
use crate::proxy::http;
use crate::util::{AUDIENCE, Harness, Start, eventually, random, set_mode};

/// The IdP (two clients), the upstream, and the agent with `[profiles.team-b]`, in this process.
struct Stack {
    h: Harness,
    /// team-b's client id.
    b_id: String,
    upstream: Upstream,
    _upstream_stop: DropGuard,
    /// `http://ADDR` of the proxy.
    origin: String,
    config: PathBuf,
    env: Vec<(String, String)>,
    metrics: std::sync::Arc<behest_agent::telemetry::Metrics>,
    /// Taken by the test to run it.
    app: Option<App>,
}

const TEAM_B: &str =
    "\n[profiles.team-b]\nclient_id = \"{B}\"\nclient_secret_file = \"{SECRET}\"\n";

impl Stack {
    async fn start(extra_env: &[(&str, &str)]) -> Stack {
        let b_id = format!("team-b-{}", random(8));
        let b_secret = format!("sec-{}", random(32));
        let other = (b_id.clone(), SecretString::from(b_secret.clone()));
        let h = Harness::start_with(|o| o.other_clients = vec![other]).await;
        let secret_file = h.path("team-b-secret");
        std::fs::write(&secret_file, format!("{b_secret}\n")).unwrap();
        set_mode(&secret_file, 0o600);
        h.remember(&b_secret);
        let (upstream, upstream_stop) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
            .await
            .unwrap();
        let mut env: Vec<(String, String)> = [
            ("BEHEST_AGENT__PROXY__LISTEN", "127.0.0.1:0".to_string()),
            ("BEHEST_AGENT__PROXY__UPSTREAM", upstream.base_url()),
            (
                "BEHEST_AGENT__PROXY__ALLOW_INSECURE_UPSTREAM",
                "true".into(),
            ),
            (
                "BEHEST_AGENT__USAGE__LEDGER_FILE",
                h.path("state/usage.jsonl").display().to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let config = h.path("config.toml");
        let mut s = Stack {
            h,
            b_id,
            upstream,
            _upstream_stop: upstream_stop,
            origin: String::new(),
            config,
            env,
            metrics: Default::default(),
            app: None,
        };
        s.write_config(&s.team_b());
        let app = App::build(s.settings(), clock::system())
            .await
            .expect("the agent starts");
        let addr = match app.proxy_addresses()[0] {
            ListenAddr::Tcp(a) => a,
            _ => unreachable!(),
        };
        s.origin = format!("http://{addr}");
        s.metrics = app.metrics();
        s.app = Some(app);
        s
    }

    /// Runs the agent until the returned token is cancelled; the task ends when it has stopped.
    fn run(&mut self) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let stop = CancellationToken::new();
        let app = self.app.take().expect("not running yet");
        (stop.clone(), tokio::spawn(app.run(stop)))
    }

    /// The `[profiles.team-b]` section.
    fn team_b(&self) -> String {
        TEAM_B.replace("{B}", &self.b_id).replace(
            "{SECRET}",
            &self.h.path("team-b-secret").display().to_string(),
        )
    }

    fn write_config(&self, text: &str) {
        std::fs::write(&self.config, text).unwrap();
    }

    fn settings(&self) -> Settings {
        let extra: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        config::load(&LoadOptions {
            path: Some(self.config.clone()),
            default_path: None,
            env: self.h.env(&extra),
            overrides: vec![],
        })
        .expect("the test config is valid")
    }

    /// The binary, with this stack's config and environment.
    fn cli(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = self.h.agent(args, &[]);
        c.env("BEHEST_AGENT_CONFIG", &self.config);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// The uid the upstream verified on the last request to `path`.
    fn uid_of_last(&self, path: &str) -> String {
        let r = self
            .upstream
            .requests()
            .into_iter()
            .rev()
            .find(|r| r.path == path)
            .unwrap_or_else(|| panic!("the upstream saw no {path}"));
        r.claims.expect("a verified bearer")["uid"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

async fn get(url: &str) -> (u16, Value) {
    let r = http().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The claims of a JWT (its payload, not verified: the test only reads `uid`).
fn jwt_claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.trim().split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn a_p_name_path_carries_that_profiles_token_and_any_other_path_the_defaults() {
    let mut s = Stack::start(&[]).await;
    let (stop, run) = s.run();
    let o = &s.origin;

    assert_eq!(get(&format!("{o}/p/team-b/v1/models?n=1")).await.0, 200);
    assert_eq!(s.uid_of_last("/v1/models?n=1"), s.b_id, "team-b's token");
    assert_eq!(get(&format!("{o}/v1/models?n=2")).await.0, 200);
    assert_eq!(
        s.uid_of_last("/v1/models?n=2"),
        s.h.client_id,
        "the default's"
    );
    assert_eq!(get(&format!("{o}/p/default/v1/models?n=3")).await.0, 200);
    assert_eq!(s.uid_of_last("/v1/models?n=3"), s.h.client_id);

    // With a session after the profile: both apply, both prefixes are stripped.
    assert_eq!(
        get(&format!("{o}/p/team-b/s/job-1/v1/models?n=4")).await.0,
        200
    );
    let r = s.upstream.requests().pop().unwrap();
    assert_eq!(r.path, "/v1/models?n=4");
    assert_eq!(r.session_id.as_deref(), Some("job-1"));
    assert_eq!(r.claims.unwrap()["uid"], s.b_id.as_str());

    // An unknown profile: 404 in the OpenAI error shape, nothing forwarded.
    let before = s.upstream.request_count();
    let (status, body) = get(&format!("{o}/p/nope/v1/models")).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "unknown_profile", "{body}");
    assert_eq!(body["error"]["type"], "behest_agent_error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("its profiles: default, team-b"),
        "{body}"
    );
    assert_eq!(s.upstream.request_count(), before);

    // The ledger names the profile each accounted request went with.
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    for path in [
        "/p/team-b/s/job-2/v1/chat/completions",
        "/s/job-2/v1/chat/completions",
    ] {
        let r = http()
            .post(format!("{o}{path}"))
            .json(&chat)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let ledger = s.h.path("state/usage.jsonl");
    let mut lines: Vec<Value> = Vec::new();
    eventually(Duration::from_secs(30), "two ledger lines", || {
        lines = std::fs::read_to_string(&ledger)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        lines.len() == 2
    })
    .await;
    let mut profiles: Vec<&str> = lines
        .iter()
        .map(|l| l["profile"].as_str().unwrap())
        .collect();
    profiles.sort_unstable();
    assert_eq!(profiles, ["default", "team-b"]);

    // Grants are counted per profile in the metrics.
    let text = s.metrics.encode();
    assert!(
        text.contains("behest_agent_grants_total{profile=\"team-b\",result=\"ok\",code=\"\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("behest_agent_grants_total{profile=\"default\",result=\"ok\",code=\"\"} 1"),
        "{text}"
    );
    stop.cancel();
    run.await.unwrap();
    s.h.assert_no_secrets_logged();
}

#[tokio::test]
async fn the_openai_sdk_works_through_a_profiles_base_url() {
    let mut s = Stack::start(&[]).await;
    let (stop, run) = s.run();
    let base = format!("{}/p/team-b/v1", s.origin);
    let chat = openai_client(&base, "chat", &[]).await;
    assert_eq!(chat["ok"], true, "{chat}");
    let stream = openai_client(&base, "stream", &[]).await;
    assert_eq!(stream["ok"], true, "{stream}");
    let reqs = s.upstream.requests();
    assert!(reqs.len() >= 2);
    for r in reqs {
        assert_eq!(
            r.claims.expect("verified")["uid"],
            s.b_id.as_str(),
            "{}",
            r.path
        );
    }
    stop.cancel();
    run.await.unwrap();
}

#[tokio::test]
async fn a_hundred_concurrent_requests_to_each_profile_make_one_grant_per_profile() {
    let mut s = Stack::start(&[]).await;
    let (stop, run) = s.run();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let prefix = if i % 2 == 0 { "/p/team-b" } else { "" };
        let url = format!("{}{prefix}/v1/models?i={i}", s.origin);
        tasks.push(tokio::spawn(async move { get(&url).await.0 }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(s.h.idp.grants_for(&s.h.client_id), 1, "the default's");
    assert_eq!(s.h.idp.grants_for(&s.b_id), 1, "team-b's");
    let b = s
        .upstream
        .requests()
        .into_iter()
        .filter(|r| r.claims.as_ref().unwrap()["uid"] == s.b_id.as_str())
        .count();
    assert_eq!(b, 100);
    stop.cancel();
    run.await.unwrap();
}

#[tokio::test]
async fn profiles_each_keep_their_own_disk_cache_file() {
    let mut s = Stack::start(&[]).await;
    let (stop, run) = s.run();
    assert_eq!(
        get(&format!("{}/p/team-b/v1/models", s.origin)).await.0,
        200
    );
    assert_eq!(get(&format!("{}/v1/models", s.origin)).await.0, 200);
    stop.cancel();
    run.await.unwrap();
    let read = |name: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(s.h.path(name)).unwrap()).unwrap()
    };
    assert_eq!(
        read("state/token.json")["key"]["client_id"],
        s.h.client_id.as_str()
    );
    assert_eq!(
        read("state/token-team-b.json")["key"]["client_id"],
        s.b_id.as_str()
    );

    // A restart reuses both: no grant for either.
    let app = App::build(s.settings(), clock::system()).await.unwrap();
    let (a, b) = (
        s.h.idp.grants_for(&s.h.client_id),
        s.h.idp.grants_for(&s.b_id),
    );
    assert_eq!((a, b), (1, 1));
    let addr = app.proxy_addresses()[0].clone();
    let stop = CancellationToken::new();
    let run = tokio::spawn(app.run(stop.clone()));
    assert_eq!(
        get(&format!("http://{addr}/p/team-b/v1/models")).await.0,
        200
    );
    assert_eq!(get(&format!("http://{addr}/v1/models")).await.0, 200);
    assert_eq!(
        s.h.idp.grants_for(&s.b_id),
        1,
        "team-b's cached token was used"
    );
    assert_eq!(s.h.idp.grants_for(&s.h.client_id), 1);
    stop.cancel();
    run.await.unwrap();
}

#[tokio::test]
async fn token_status_and_env_take_a_profile_and_the_control_api_refuses_an_unknown_one() {
    let mut s = Stack::start(&[]).await;
    let (stop, run) = s.run();
    let cli = |args: &[&str]| s.cli(args);

    let out = cli(&["token", "--profile", "team-b"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    s.h.remember(token.trim());
    assert_eq!(jwt_claims(&token)["uid"], s.b_id.as_str());
    let out = cli(&["token"]).output().await.unwrap();
    assert_eq!(
        jwt_claims(&String::from_utf8(out.stdout).unwrap())["uid"],
        s.h.client_id.as_str()
    );
    assert_eq!(
        s.h.idp.grants_for(&s.b_id),
        1,
        "the daemon's token, no one-shot grant"
    );

    let out = cli(&["status", "--json"]).output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        doc["profiles"]["team-b"]["token"]["claims"]["uid"],
        s.b_id.as_str(),
        "{doc}"
    );
    assert_eq!(
        doc["profiles"]["default"]["token"]["claims"]["uid"],
        s.h.client_id.as_str()
    );
    assert_eq!(
        doc["token"]["claims"]["uid"],
        s.h.client_id.as_str(),
        "top level: the default"
    );
    let out = cli(&["status", "--json", "--profile", "team-b"])
        .output()
        .await
        .unwrap();
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["token"]["claims"]["uid"], s.b_id.as_str(), "{doc}");

    let out = cli(&["env", "--profile", "team-b", "--session", "j1"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(&format!("OPENAI_BASE_URL='{}/p/team-b/s/j1/v1'", s.origin)),
        "{text}"
    );

    // refresh: a grant for that profile only.
    let default_grants = s.h.idp.grants_for(&s.h.client_id);
    let out = cli(&["refresh", "--profile", "team-b"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s.h.idp.grants_for(&s.b_id), 2);
    assert_eq!(s.h.idp.grants_for(&s.h.client_id), default_grants);

    // exec: the command's base URL names the profile, and its requests carry that token.
    let out = cli(&[
        "exec",
        "--profile",
        "team-b",
        "--session",
        "j2",
        "--no-summary",
        "--",
        "sh",
        "-c",
        "echo \"$OPENAI_BASE_URL\"",
    ])
    .output()
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let base = String::from_utf8(out.stdout).unwrap();
    assert_eq!(base.trim(), format!("{}/p/team-b/s/j2/v1", s.origin));
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let r = http()
        .post(format!("{}/chat/completions", base.trim()))
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    assert_eq!(s.uid_of_last("/v1/chat/completions"), s.b_id);

    // usage: only that profile's requests.
    let out = cli(&["usage", "--profile", "team-b", "--json"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(b["totals"]["requests"], 1, "{b}");
    assert_eq!(b["sessions"]["j2"]["requests"], 1, "{b}");
    let out = cli(&["usage", "--profile", "default", "--json"])
        .output()
        .await
        .unwrap();
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["totals"]["requests"], 0, "{d}");

    let out = cli(&["token", "--profile", "nope"]).output().await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown profile is a usage error"
    );
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("team-b"));

    let socket = s.h.path("run/agent.sock");
    let d = Daemon::connect(&socket, None).await.unwrap().unwrap();
    let (code, body) = d
        .call(
            http::Method::GET,
            "/v1/token?profile=nope",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(code.as_u16(), 404);
    assert_eq!(body["error"]["code"], "unknown_profile", "{body}");
    let (code, body) = d
        .call(
            http::Method::GET,
            "/v1/token?profile=team-b",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(code.as_u16(), 200);
    assert_eq!(body["claims"]["uid"], s.b_id.as_str());
    stop.cancel();
    run.await.unwrap();
    s.h.assert_no_secrets_logged();
}

#[tokio::test]
async fn the_cli_refuses_a_daemon_whose_profile_serves_another_identity() {
    let keys = tempfile::tempdir().unwrap().keep().join("keys.json");
    let keys = keys.display().to_string();
    let mut s = Stack::start(&[("BEHEST_AGENT__PROXY__KEYS_FILE", &keys)]).await;
    let (stop, run) = s.run();
    // The CLI's team-b is another client than the daemon's.
    std::fs::write(&s.config, s.team_b().replace(&s.b_id, "someone-else")).unwrap();
    let out = s
        .cli(&["token", "--profile", "team-b"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another identity") && err.contains("someone-else"),
        "{err}"
    );
    // Nor is a key made for it: it would spend the daemon's team-b, not the one asked for.
    let out = s
        .cli(&["key", "create", "--profile", "team-b"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another identity"), "{err}");
    // The default profile is still the same identity: served.
    assert!(s.cli(&["token"]).output().await.unwrap().status.success());
    stop.cancel();
    run.await.unwrap();
}

#[tokio::test]
async fn reloads_add_and_remove_profiles_while_a_stream_to_another_goes_on() {
    // No disk cache: a token source built again would have to make a grant.
    let mut s = Stack::start(&[
        ("BEHEST_AGENT__TOKEN__CACHE_FILE", ""),
        ("BEHEST_AGENT__TELEMETRY__METRICS_LISTEN", "127.0.0.1:0"),
    ])
    .await;
    let stop = CancellationToken::new();
    let (tx, rx) = mpsc::channel(1);
    let origin = s.origin.clone();
    let app = s.app.take().unwrap();
    let metrics = format!("http://{}/metrics", app.metrics_address().unwrap());
    let team_b_ready = || async {
        let text = http()
            .get(&metrics)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.contains("behest_agent_token_ready{profile=\"team-b\"} 1")
    };
    let readyz = metrics.replace("/metrics", "/readyz?profile=");
    let run = tokio::spawn(app.run_with_reloads(stop.clone(), rx));
    assert_eq!(get(&format!("{origin}/p/team-b/v1/models")).await.0, 200);
    assert!(team_b_ready().await);
    assert_eq!(get(&format!("{readyz}team-b")).await.0, 200);
    assert_eq!(get(&format!("{readyz}nope")).await.0, 503);

    // A stream on the default profile, held after its first event.
    s.upstream
        .fail_next(1, UpstreamFault::PauseStream { after_events: 1 });
    let chat =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let mut stream = http()
        .post(format!("{origin}/v1/chat/completions"))
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let first = stream.chunk().await.unwrap().expect("the first event");
    assert!(first.starts_with(b"data: "));

    // Remove team-b.
    s.write_config("");
    tx.send(Reload {
        settings: Ok(s.settings()),
    })
    .await
    .unwrap();
    let mut status = 0;
    for _ in 0..1000 {
        status = get(&format!("{origin}/p/team-b/v1/models")).await.0;
        if status == 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, 404, "team-b is gone");
    assert_eq!(get(&format!("{origin}/v1/models")).await.0, 200);
    assert!(
        !team_b_ready().await,
        "a removed profile's gauges go with it"
    );
    assert_eq!(get(&format!("{readyz}team-b")).await.0, 503);

    // Add team-b back, and a team-c with the default's client: the default keeps its token.
    s.write_config(&format!(
        "{}\n[profiles.team-c]\nscope = \"read:models\"\n",
        s.team_b()
    ));
    tx.send(Reload {
        settings: Ok(s.settings()),
    })
    .await
    .unwrap();
    let mut status = 0;
    for _ in 0..1000 {
        status = get(&format!("{origin}/p/team-c/v1/models")).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        status,
        200,
        "team-c is served: {}",
        crate::util::logs()
            .lines()
            .filter(|l| l.contains("reload"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // team-c's request went with team-c's own token (its scope), whatever order the profiles'
    // grants came in.
    let team_c = s
        .upstream
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.path == "/v1/models" && r.status == Some(200))
        .expect("team-c's request");
    assert_eq!(
        team_c.claims.expect("verified")["scope"],
        "read:models",
        "team-c's own grant"
    );
    assert_eq!(
        get(&format!("{origin}/p/team-b/v1/models?again")).await.0,
        200
    );
    assert_eq!(s.uid_of_last("/v1/models?again"), s.b_id);
    assert!(team_b_ready().await);

    // A reload that changes nothing of team-b keeps its token source: no grant.
    let b_grants = s.h.idp.grants_for(&s.b_id);
    s.write_config(&format!(
        "{}\n[profiles.team-c]\nscope = \"read:models\"\n[proxy]\nmax_replay_body = \"2MiB\"\n",
        s.team_b()
    ));
    tx.send(Reload {
        settings: Ok(s.settings()),
    })
    .await
    .unwrap();
    for i in 0..20 {
        assert_eq!(
            get(&format!("{origin}/p/team-b/v1/models?k={i}")).await.0,
            200
        );
    }
    assert_eq!(
        s.h.idp.grants_for(&s.b_id),
        b_grants,
        "an unchanged profile keeps its token"
    );

    // The stream that began before the reloads goes on to its end.
    s.upstream.resume_stream();
    let mut rest = first.to_vec();
    while let Some(c) = stream.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert!(
        rest.ends_with(b"data: [DONE]\n\n"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
    assert_eq!(
        s.h.idp.grants_for(&s.h.client_id),
        2,
        "the default's one grant, and team-c's (same client, its own scope)"
    );
    stop.cancel();
    run.await.unwrap();
}

#[tokio::test]
async fn profile_settings_are_validated_like_auth_and_named_in_errors() {
    let h = Harness::start().await;
    let load = |text: &str, env: &[(&str, &str)]| {
        let path = h.path(&format!("c-{}.toml", random(6)));
        std::fs::write(&path, text).unwrap();
        config::load(&LoadOptions {
            path: Some(path),
            default_path: None,
            env: h.env(env),
            overrides: vec![],
        })
    };
    let err = load("[profiles.Team]\nclient_id = \"x\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("profiles.Team") && err.contains("not a profile name"),
        "{err}"
    );
    let err = load("[profiles.default]\nclient_id = \"x\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("profiles.default"), "{err}");
    let err = load("[profiles.b]\nclient_auth = \"magic\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("profiles.b.client_auth"), "{err}");
    let err = load(
        "[profiles.b]\nclient_secret_file = \"/nonexistent/s\"\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("profiles.b.client_secret_file"), "{err}");
    let err = load("[profiles.b]\nupstream = \"http://example.com\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("profiles.b.upstream"), "{err}");
    let err = load("[profiles.b]\ncache_file = \"x\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("cache_file"), "an unknown key: {err}");

    // What a profile leaves out comes from [auth]; the expected uid is its own client id.
    let s = load("[profiles.b]\nclient_id = \"bee\"\nscope = \"s\"\n", &[]).unwrap();
    let b = &s.profiles["b"];
    assert_eq!(b.auth.client_id, "bee");
    assert_eq!(b.auth.audience.as_deref(), Some(AUDIENCE));
    assert_eq!(b.token.expected_uid, "bee");
    assert_eq!(b.auth.scope.as_deref(), Some("s"));
    assert_eq!(s.auth.scope, None);
    assert_eq!(
        b.token.cache_file.as_deref(),
        Some(h.path("state/token-b.json").as_path())
    );

    // From the environment: the config crate lower-cases keys, so names with `_` work.
    let s = load(
        "",
        &[("BEHEST_AGENT__PROFILES__TEAM_B__CLIENT_ID", "from-env")],
    )
    .unwrap();
    assert_eq!(s.profiles["team_b"].auth.client_id, "from-env");
}

#[tokio::test]
async fn a_key_bound_to_a_profile_selects_it_and_is_refused_by_another() {
    let keys_file = tempfile::tempdir().unwrap().keep().join("keys.json");
    let keys_s = keys_file.display().to_string();
    let mut s = Stack::start(&[
        ("BEHEST_AGENT__PROXY__REQUIRE_KEY", "true"),
        ("BEHEST_AGENT__PROXY__KEYS_FILE", keys_s.as_str()),
    ])
    .await;
    let store = behest_agent::keys::KeyStore::open(&keys_file, clock::system()).unwrap();
    let (team_b_key, _) = store
        .create(behest_agent::keys::NewKey {
            profile: Some("team-b".into()),
            ..Default::default()
        })
        .unwrap();
    s.h.remember(&team_b_key);
    let (stop, task) = s.run();
    let o = s.origin.clone();
    let with_key = |url: String| {
        let key = team_b_key.clone();
        async move {
            let r = http().get(url).bearer_auth(key).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    // The daemon picks up the key written to its file within a second.
    let mut status = 0;
    for _ in 0..100 {
        status = with_key(format!("{o}/v1/models?k=1")).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200);
    assert_eq!(
        s.uid_of_last("/v1/models?k=1"),
        s.b_id,
        "the key's profile, with no /p/ in the path"
    );
    assert_eq!(with_key(format!("{o}/p/team-b/v1/models?k=2")).await.0, 200);
    assert_eq!(s.uid_of_last("/v1/models?k=2"), s.b_id);
    let before = s.upstream.request_count();
    let (status, body) = with_key(format!("{o}/p/default/v1/models?k=3")).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "forbidden_profile");
    assert_eq!(s.upstream.request_count(), before, "nothing forwarded");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn with_a_daemon_an_unknown_profile_is_refused_before_anything_is_made_naming_its_profiles() {
    let keys_file = tempfile::tempdir().unwrap().keep().join("keys.json");
    let keys_s = keys_file.display().to_string();
    let mut s = Stack::start(&[
        ("BEHEST_AGENT__PROXY__REQUIRE_KEY", "true"),
        ("BEHEST_AGENT__PROXY__KEYS_FILE", keys_s.as_str()),
    ])
    .await;
    let (stop, task) = s.run();
    // A CLI without the daemon's configuration (it does not validate): it knows only the
    // socket, so the daemon is the one to say which profiles there are.
    let bare = |args: &[&str]| {
        s.h.agent(args, &[("BEHEST_AGENT__AUTH__CLIENT_ID", "")])
            .output()
    };
    let out = bare(&["env", "--profile", "team-b", "--format", "dotenv"])
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(&format!("OPENAI_BASE_URL={}/p/team-b/", s.origin)),
        "the daemon's proxy: {text}"
    );
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("OPENAI_API_KEY="))
        .unwrap();
    s.h.remember(key);

    let socket = s.h.path("run/agent.sock");
    let d = Daemon::connect(&socket, None).await.unwrap().unwrap();
    let keys = || async {
        d.request(http::Method::GET, "/v1/keys", Duration::from_secs(10))
            .await
            .unwrap()["keys"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(keys().await, 1, "env's key");
    let listed = d
        .request(http::Method::GET, "/v1/keys", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        listed["keys"][0]["profile"], "team-b",
        "env's key is bound to its profile: {listed}"
    );
    for args in [
        &["env", "--profile", "nope"][..],
        &["exec", "--profile", "nope", "--", "echo", "ran"],
        &["token", "--profile", "nope"],
        &["status", "--profile", "nope"],
        &["refresh", "--profile", "nope"],
        &["usage", "--profile", "nope"],
        &["key", "create", "--profile", "nope"],
    ] {
        let out = bare(args).await.unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(
            err.contains("no profile `nope` (profiles: default, team-b)"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(keys().await, 1, "no key made for an unknown profile");

    // The control API says the same.
    let (code, body) = d
        .call(
            http::Method::POST,
            "/v1/keys?profile=nope",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(code.as_u16(), 404);
    assert_eq!(body["error"]["code"], "unknown_profile", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("(profiles: default, team-b)"),
        "{body}"
    );
    assert_eq!(keys().await, 1);
    stop.cancel();
    task.await.unwrap();
    s.h.assert_no_secrets_logged();
}

/// A key that takes a restart is said to on reload and stays as it was, in full: `[egress]` was
/// half applied (the upstream through the new proxy, the IdP not), and a change back was warned
/// about again.
#[tokio::test]
async fn a_reload_keeps_the_keys_that_take_a_restart_and_says_so_once() {
    let mut s = Stack::start(&[]).await;
    let stop = CancellationToken::new();
    let (tx, rx) = mpsc::channel(1);
    let origin = s.origin.clone();
    let app = s.app.take().unwrap();
    let run = tokio::spawn(app.run_with_reloads(stop.clone(), rx));
    assert_eq!(get(&format!("{origin}/v1/models")).await.0, 200);
    let said = || {
        crate::util::logs()
            .matches("[egress] changed: it applies after a restart")
            .count()
    };
    // Nothing listens on the discard port: through it, every request would fail.
    s.write_config("[egress]\nproxy = \"http://127.0.0.1:9\"\nno_proxy = \"example.invalid\"\n");
    tx.send(Reload {
        settings: Ok(s.settings()),
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(10), "the reload's warning", || {
        said() == 1
    })
    .await;
    assert_eq!(get(&format!("{origin}/v1/models")).await.0, 200);
    // Back as it was: nothing changed, nothing said.
    s.write_config("");
    tx.send(Reload {
        settings: Ok(s.settings()),
    })
    .await
    .unwrap();
    // A reload that is then applied: the next one is only read after it.
    s.write_config("[telemetry]\nlog_level = \"info\"\n");
    tx.send(Reload {
        settings: Ok(s.settings()),
    })
    .await
    .unwrap();
    assert_eq!(get(&format!("{origin}/v1/models")).await.0, 200);
    assert_eq!(said(), 1);
    stop.cancel();
    run.await.unwrap();
}

/// Sends `settings` as a reload, then two more of the same: once the last is taken, the first
/// has been applied (the daemon applies one before it reads the next).
async fn reload_and_wait(tx: &mpsc::Sender<Reload>, s: &Stack) {
    for _ in 0..3 {
        tx.send(Reload {
            settings: Ok(s.settings()),
        })
        .await
        .unwrap();
    }
}

/// A reload that changes the listeners' limits serves on new accept loops: an address kept keeps
/// its socket (port 0 its port: it was bound again on a new one, and clients were refused in
/// between), and `status` keeps its totals, a request in flight across the reload included (it
/// counted into the old totals, lost). An address that cannot be bound refuses the reload,
/// and the old listeners go on serving (they were closed first, and nothing served).
#[tokio::test]
async fn a_reload_keeps_the_sockets_it_keeps_and_refuses_an_address_it_cannot_bind() {
    let mut s = Stack::start(&[]).await;
    let stop = CancellationToken::new();
    let (tx, rx) = mpsc::channel(1);
    let origin = s.origin.clone();
    let app = s.app.take().unwrap();
    let run = tokio::spawn(app.run_with_reloads(stop.clone(), rx));
    for _ in 0..3 {
        assert_eq!(get(&format!("{origin}/v1/models")).await.0, 200);
    }
    let status = || async {
        let out = s.cli(&["status", "--json"]).output().await.unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let addr = origin.trim_start_matches("http://").to_string();
    // A request in flight: all but its last byte sent; its answer comes after the reload, and
    // counts in the same totals.
    let mut half = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let body = r#"{"model":"m","input":"x"}"#;
    {
        use tokio::io::AsyncWriteExt;
        let head = format!(
            "POST /v1/embeddings HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        half.write_all(head.as_bytes()).await.unwrap();
        half.write_all(&body.as_bytes()[..body.len() - 1])
            .await
            .unwrap();
    }
    for _ in 0..1000 {
        if status().await["proxy"]["in_flight"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status().await["proxy"]["in_flight"], 1);
    // A new header_read_timeout starts new accept loops.
    s.write_config("[proxy]\nheader_read_timeout = \"29s\"\n");
    reload_and_wait(&tx, &s).await;
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        half.write_all(&body.as_bytes()[body.len() - 1..])
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = half.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    }
    let seen = status().await;
    assert_eq!(
        seen["daemon"]["listen"],
        json!([origin.trim_start_matches("http://")])
    );
    assert_eq!(seen["proxy"]["requests_total"], 4, "{seen}");
    assert_eq!(seen["proxy"]["responses"]["2xx"], 4, "{seen}");
    assert_eq!(seen["proxy"]["in_flight"], 0, "{seen}");
    assert_eq!(get(&format!("{origin}/v1/models")).await.0, 200);

    // An address another socket holds: the reload is refused as a whole.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().to_string();
    let listen = format!("127.0.0.1:0,{taken}");
    for (k, v) in s.env.iter_mut() {
        if k == "BEHEST_AGENT__PROXY__LISTEN" {
            *v = listen.clone();
        }
    }
    s.write_config("[proxy]\nheader_read_timeout = \"28s\"\n");
    reload_and_wait(&tx, &s).await;
    assert_eq!(get(&format!("{origin}/v1/models")).await.0, 200);
    assert!(
        crate::util::logs().contains(&format!(
            "reload refused, the previous configuration keeps running: cannot listen on {taken}"
        )),
        "the refusal names the address"
    );
    stop.cancel();
    run.await.unwrap();
}
