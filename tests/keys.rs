//! Local keys (SPEC §9) end to end: the daemon (`App`) with `proxy.require_key`, keys made by the
//! real binary (`key create|list|revoke`, `exec`, `env`) through its control socket or on the file,
//! and requests from the real OpenAI SDK and from reqwest over real sockets.

use std::path::PathBuf;
use std::time::Duration;

use behest_agent::config::{self, LoadOptions};
use serde_json::Value;

use crate::node::openai_client;
use crate::proxy::{Stack, http, stack_with};
use crate::rig::sha256_hex;
use crate::util::{Start, eventually, mode_of};

/// A daemon that requires keys, its keys file, and the socket the CLI finds it on.
struct Keyed {
    s: Stack,
    keys_file: PathBuf,
    socket: String,
    _dir: tempfile::TempDir,
}

async fn keyed() -> Keyed {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("state/keys.json");
    let kf = keys_file.display().to_string();
    let s = stack_with(
        |_| {},
        &[
            ("BEHEST_AGENT__PROXY__REQUIRE_KEY", "true"),
            ("BEHEST_AGENT__PROXY__KEYS_FILE", kf.as_str()),
        ],
    )
    .await;
    let socket = s.h.path("stack/agent.sock").display().to_string();
    Keyed {
        s,
        keys_file,
        socket,
        _dir: dir,
    }
}

impl Keyed {
    /// The binary, pointed at this daemon's socket and keys file.
    async fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_on(&self.socket, args).await
    }

    /// The binary with another control socket (`…/none.sock`: no daemon there).
    async fn cli_on(&self, socket: &str, args: &[&str]) -> std::process::Output {
        let kf = self.keys_file.display().to_string();
        self.s
            .h
            .agent(
                args,
                &[
                    ("BEHEST_AGENT__CONTROL__SOCKET", socket),
                    ("BEHEST_AGENT__PROXY__KEYS_FILE", kf.as_str()),
                    ("BEHEST_AGENT__PROXY__REQUIRE_KEY", "true"),
                ],
            )
            .output()
            .await
            .unwrap()
    }

    /// `key create ARGS`: the key printed.
    async fn create(&self, args: &[&str]) -> String {
        let mut all = vec!["key", "create"];
        all.extend_from_slice(args);
        let out = self.cli(&all).await;
        assert!(out.status.success(), "{}", stderr(&out));
        let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(key.starts_with("bak_"), "{key}");
        self.s.h.remember(&key);
        key
    }

    /// `key list --json`.
    async fn list(&self) -> Vec<Value> {
        let out = self.cli(&["key", "list", "--json"]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn models_url(&self) -> String {
        format!("{}/models", self.s.base)
    }

    /// GET /v1/models with `header: value`: the status and the error code, if any.
    async fn get_with(&self, header: &str, value: &str) -> (u16, String) {
        let r = http()
            .get(self.models_url())
            .header(header, value)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        let code = body["error"]["code"].as_str().unwrap_or("").to_string();
        (status, code)
    }

    async fn bearer(&self, key: &str) -> (u16, String) {
        self.get_with("authorization", &format!("Bearer {key}"))
            .await
    }

    fn none_socket(&self) -> String {
        self.s.h.path("nowhere/none.sock").display().to_string()
    }
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn the_openai_sdk_is_served_with_a_local_key_and_refused_without_one() {
    let k = keyed().await;
    let key = k.create(&["--name", "sdk"]).await;
    let ok = openai_client(&k.s.base, "chat", &[("OPENAI_API_KEY", key.as_str())]).await;
    assert_eq!(ok["ok"], true, "{ok}");
    let stream = openai_client(&k.s.base, "stream", &[("OPENAI_API_KEY", key.as_str())]).await;
    assert_eq!(stream["ok"], true, "{stream}");
    let served = k.s.upstream.requests().len();
    let wrong = format!("bak_{}", crate::util::random(43));
    for api_key in ["placeholder", wrong.as_str()] {
        let r = openai_client(&k.s.base, "chat", &[("OPENAI_API_KEY", api_key)]).await;
        assert_eq!(r["ok"], false, "{r}");
        assert_eq!(r["status"], 401, "{r}");
        assert!(r["error"].as_str().unwrap().contains("local key"), "{r}");
    }
    assert_eq!((k.bearer(&wrong).await), (401, "invalid_local_key".into()));
    // Nothing refused reached the upstream, and what did carried the agent's token, not the key.
    assert_eq!(k.s.upstream.requests().len(), served);
    for r in k.s.upstream.requests() {
        assert_eq!(r.bearer, devkit::upstream::BearerKind::Jwt);
        assert!(r.headers.iter().all(|(_, v)| !v.contains(&key)));
    }
    k.s.finish().await;
}

#[tokio::test]
async fn a_request_without_a_key_is_refused_with_the_openai_error_shape() {
    let k = keyed().await;
    let r = http().get(k.models_url()).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_local_key", "{body}");
    assert_eq!(body["error"]["type"], "behest_agent_error", "{body}");
    assert!(k.s.upstream.requests().is_empty());
    k.s.finish().await;
}

#[tokio::test]
async fn api_key_and_x_api_key_headers_carry_a_key_and_are_not_forwarded() {
    let k = keyed().await;
    let key = k.create(&[]).await;
    assert_eq!(k.get_with("api-key", &key).await.0, 200);
    assert_eq!(k.get_with("x-api-key", &key).await.0, 200);
    assert_eq!(k.get_with("x-api-key", "bak_wrong").await.0, 401);
    let reqs = k.s.upstream.requests();
    assert_eq!(reqs.len(), 2);
    for r in reqs {
        assert_eq!(r.header("api-key"), None);
        assert_eq!(r.header("x-api-key"), None);
    }
    k.s.finish().await;
}

#[tokio::test]
async fn a_revoked_key_is_refused_on_the_very_next_request() {
    let k = keyed().await;
    let key = k.create(&["--name", "soon-gone"]).await;
    assert_eq!(k.bearer(&key).await.0, 200);
    let list = k.list().await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert!(list[0]["last_used"].is_string(), "{list:?}");
    let out = k.cli(&["key", "revoke", &id]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(k.bearer(&key).await, (401, "invalid_local_key".into()));
    assert!(k.list().await.is_empty());
    let out = k.cli(&["key", "revoke", &id]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no key has the id"),
        "{}",
        stderr(&out)
    );
    k.s.finish().await;
}

#[tokio::test]
async fn an_expired_key_is_refused() {
    let k = keyed().await;
    let made = tokio::time::Instant::now();
    let key = k.create(&["--ttl", "1s"]).await;
    let list = k.list().await;
    assert!(list[0]["expires_at"].is_string(), "{list:?}");
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, code) = k.bearer(&key).await;
        if status == 401 {
            assert_eq!(code, "invalid_local_key");
            // Never before its TTL (whole seconds once cut it short: made at :12.9, gone at :13).
            assert!(
                made.elapsed() >= Duration::from_secs(1),
                "{:?}",
                made.elapsed()
            );
            break;
        }
        assert_eq!(status, 200);
        assert!(tokio::time::Instant::now() < end, "the key never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(k.list().await[0]["expired"], true);
    k.s.finish().await;
}

#[tokio::test]
async fn a_session_bound_key_sets_the_session_whatever_the_request_says() {
    let k = keyed().await;
    let key = k.create(&["--session", "job-7"]).await;
    let addr = k.s.base.trim_end_matches("/v1").to_string();
    let r = http()
        .get(format!("{addr}/s/other/v1/models"))
        .bearer_auth(&key)
        .header("x-session-id", "mine")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let plain = k.create(&[]).await;
    let r = http()
        .get(k.models_url())
        .bearer_auth(&plain)
        .header("x-session-id", "mine")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let sessions: Vec<Option<String>> =
        k.s.upstream
            .requests()
            .into_iter()
            .map(|r| r.session_id)
            .collect();
    assert_eq!(sessions, [Some("job-7".into()), Some("mine".into())]);
    k.s.finish().await;
}

#[tokio::test]
async fn the_keys_file_is_private_holds_only_hashes_and_is_replaced_whole() {
    let k = keyed().await;
    let a = k.create(&[]).await;
    let ino = |p: &PathBuf| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let first = ino(&k.keys_file);
    let b = k.create(&[]).await;
    assert_ne!(
        ino(&k.keys_file),
        first,
        "written in place, not renamed over"
    );
    assert_eq!(mode_of(&k.keys_file), 0o600);
    let text = std::fs::read_to_string(&k.keys_file).unwrap();
    for key in [&a, &b] {
        assert!(!text.contains(key.as_str()));
        assert!(!text.contains(&key[4..]));
        assert!(text.contains(&sha256_hex(key.as_bytes())), "{text}");
    }
    let dir = k.keys_file.parent().unwrap();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["keys.json", "keys.json.lock"],
        "no temporary file is left behind"
    );
    assert_eq!(mode_of(&dir.join("keys.json.lock")), 0o600);
    // `key list` never shows a key or its hash.
    let out = k.cli(&["key", "list"]).await;
    let json = k.cli(&["key", "list", "--json"]).await;
    for o in [&out, &json] {
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains(k.list().await[0]["id"].as_str().unwrap()));
        for key in [&a, &b] {
            assert!(!text.contains(&key[4..]));
            assert!(!text.contains(&sha256_hex(key.as_bytes())));
        }
    }
    k.s.finish().await;
}

#[tokio::test]
async fn a_corrupt_keys_file_keeps_the_previous_keys_and_says_so() {
    let k = keyed().await;
    let key = k.create(&[]).await;
    std::fs::write(&k.keys_file, "{ this is not json").unwrap();
    // The request path notices the edit (within a second), logs what is wrong, and keeps the
    // keys it had in force.
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while !crate::util::logs().contains(&format!("{} is not valid", k.keys_file.display())) {
        assert_eq!(k.bearer(&key).await.0, 200);
        assert!(
            tokio::time::Instant::now() < end,
            "the broken file was never reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(k.bearer(&key).await.0, 200);
    // `key list` says so too.
    let out = k.cli(&["key", "list"]).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("is not valid") && err.contains("stay in force"),
        "{err}"
    );
    // Nothing overwrites the broken file: not the daemon…
    let out = k.cli(&["key", "create"]).await;
    assert!(!out.status.success(), "{}", stderr(&out));
    // …nor the CLI without a daemon.
    let out = k.cli_on(&k.none_socket(), &["key", "create"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is not valid"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(&k.keys_file).unwrap(),
        "{ this is not json"
    );
    k.s.finish().await;
}

/// A FIFO planted in the keys file's place is refused as not a file, the keys in force stay: its
/// open waited for a writer, and with it every request and `key list`.
#[tokio::test]
async fn a_fifo_in_place_of_the_keys_file_keeps_the_previous_keys() {
    let k = keyed().await;
    let key = k.create(&[]).await;
    std::fs::remove_file(&k.keys_file).unwrap();
    nix::unistd::mkfifo(
        &k.keys_file,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let said = format!("{} is not valid", k.keys_file.display());
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while !crate::util::logs().contains(&said) {
        assert_eq!(k.bearer(&key).await.0, 200);
        assert!(
            tokio::time::Instant::now() < end,
            "the FIFO was never reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(k.bearer(&key).await.0, 200);
    let out = k.cli_on(&k.none_socket(), &["key", "list"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a regular file"),
        "{}",
        stderr(&out)
    );
    k.s.finish().await;
}

/// A keys file in a directory every user may write (no sticky bit) is refused: another user
/// could move it away (every key refused) or swap in a FIFO. It was read without a word.
#[tokio::test]
async fn a_keys_file_in_a_directory_others_may_write_is_refused() {
    let k = keyed().await;
    k.create(&[]).await;
    let dir = k.keys_file.parent().unwrap();
    crate::util::set_mode(dir, 0o777);
    let out = k.cli_on(&k.none_socket(), &["key", "list"]).await;
    crate::util::set_mode(dir, 0o700);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("writable by every user without the sticky bit")
            && err.contains(&dir.display().to_string()),
        "{err}"
    );
    k.s.finish().await;
}

#[tokio::test]
async fn the_daemon_takes_a_key_another_process_wrote_to_the_file() {
    let k = keyed().await;
    // No daemon on that socket: the CLI writes the file itself.
    let out = k.cli_on(&k.none_socket(), &["key", "create"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    k.s.h.remember(&key);
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while k.bearer(&key).await.0 != 200 {
        assert!(
            tokio::time::Instant::now() < end,
            "the daemon never took the key"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And one revoked on the file is refused soon after.
    let id = k.list().await[0]["id"].as_str().unwrap().to_string();
    let out = k.cli_on(&k.none_socket(), &["key", "revoke", &id]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while k.bearer(&key).await.0 != 401 {
        assert!(
            tokio::time::Instant::now() < end,
            "the revoke never applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    k.s.finish().await;
}

#[tokio::test]
async fn exec_gives_the_command_a_key_of_its_own_and_revokes_it_when_it_exits() {
    exec_key_is_revoked(false).await;
}

#[tokio::test]
async fn exec_revokes_the_commands_key_when_a_signal_ends_it() {
    exec_key_is_revoked(true).await;
}

/// `exec` under a daemon that requires keys: the command gets a key bound to its session, which
/// works while it runs and is refused once it exited (by itself, or on SIGTERM sent to `exec`).
async fn exec_key_is_revoked(by_signal: bool) {
    let k = keyed().await;
    let key_file = k.s.h.path("exec-key");
    let go = k.s.h.path("exec-go");
    let script = format!(
        "printf %s \"$OPENAI_API_KEY\" > {kf}.tmp && mv {kf}.tmp {kf}; i=0; while [ ! -e {go} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done",
        kf = key_file.display(),
        go = go.display()
    );
    let kf = k.keys_file.display().to_string();
    let mut child =
        k.s.h
            .agent(
                &[
                    "exec",
                    "--session",
                    "job-exec",
                    "--no-summary",
                    "--",
                    "sh",
                    "-c",
                    &script,
                ],
                &[
                    ("BEHEST_AGENT__CONTROL__SOCKET", k.socket.as_str()),
                    ("BEHEST_AGENT__PROXY__KEYS_FILE", kf.as_str()),
                ],
            )
            .spawn()
            .unwrap();
    eventually(Duration::from_secs(30), "the command wrote its key", || {
        key_file.exists()
    })
    .await;
    let key = std::fs::read_to_string(&key_file).unwrap();
    k.s.h.remember(&key);
    assert!(key.starts_with("bak_"), "{key}");
    assert_eq!(k.bearer(&key).await.0, 200);
    assert_eq!(
        k.s.upstream.requests()[0].session_id.as_deref(),
        Some("job-exec")
    );
    let list = k.list().await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["session"], "job-exec");
    // It expires after 12 h (exec's --ttl) even when exec is SIGKILLed before it can revoke it.
    let expires = humantime::parse_rfc3339(list[0]["expires_at"].as_str().unwrap()).unwrap();
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(
        left > Duration::from_secs(11 * 3600) && left <= Duration::from_secs(12 * 3600 + 1),
        "{left:?}"
    );
    if by_signal {
        crate::util::signal(&child, nix::sys::signal::Signal::SIGTERM);
    } else {
        std::fs::write(&go, "").unwrap();
    }
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.success(), !by_signal, "{status:?}");
    assert_eq!(k.bearer(&key).await, (401, "invalid_local_key".into()));
    assert!(k.list().await.is_empty());
    k.s.finish().await;
}

#[tokio::test]
async fn env_prints_a_key_valid_for_its_ttl() {
    let k = keyed().await;
    let kf = k.keys_file.display().to_string();
    let out =
        k.s.h
            .agent(
                &["env", "--format", "dotenv", "--ttl", "1h"],
                &[
                    ("BEHEST_AGENT__CONTROL__SOCKET", k.socket.as_str()),
                    ("BEHEST_AGENT__PROXY__KEYS_FILE", kf.as_str()),
                ],
            )
            .output()
            .await
            .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("OPENAI_API_KEY="))
        .unwrap()
        .to_string();
    k.s.h.remember(&key);
    assert!(key.starts_with("bak_"), "{text}");
    assert!(!stderr(&out).contains(&key));
    assert_eq!(k.bearer(&key).await.0, 200);
    let list = k.list().await;
    assert_eq!(list[0]["name"], "env");
    let expires = humantime::parse_rfc3339(list[0]["expires_at"].as_str().unwrap()).unwrap();
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(
        left > Duration::from_secs(50 * 60) && left <= Duration::from_secs(3601),
        "{left:?}"
    );
    k.s.finish().await;
}

#[tokio::test]
async fn the_daemon_status_says_whether_it_requires_keys() {
    let k = keyed().await;
    let out = k.cli(&["status", "--json"]).await;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["daemon"]["require_key"], true, "{v}");
    k.s.finish().await;
}

#[test]
fn a_non_loopback_listen_needs_allow_remote_and_require_key() {
    let load = |extra: &[(&str, &str)]| {
        let mut env: std::collections::HashMap<String, String> = [
            ("AUTH0_DOMAIN", "tenant.example.auth0.com"),
            ("AUTH0_CLIENT_ID", "c"),
            ("AUTH0_CLIENT_SECRET", "s"),
            ("AUTH0_AUDIENCE", "https://api.behest.test"),
            ("HOME", "/nonexistent-home"),
            ("BEHEST_AGENT__PROXY__LISTEN", "0.0.0.0:8711"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            env.insert(k.to_string(), v.to_string());
        }
        config::load(&LoadOptions {
            path: None,
            default_path: None,
            env,
            overrides: vec![],
        })
    };
    for extra in [
        &[][..],
        &[("BEHEST_AGENT__PROXY__ALLOW_REMOTE", "true")][..],
        &[("BEHEST_AGENT__PROXY__REQUIRE_KEY", "true")][..],
    ] {
        let msg = load(extra).unwrap_err().to_string();
        assert!(
            msg.contains("proxy.allow_remote") && msg.contains("proxy.require_key"),
            "{msg}"
        );
    }
    let s = load(&[
        ("BEHEST_AGENT__PROXY__ALLOW_REMOTE", "true"),
        ("BEHEST_AGENT__PROXY__REQUIRE_KEY", "true"),
        (
            "BEHEST_AGENT__PROXY__ALLOWED_HOSTS",
            "behest-agent,agent.ci",
        ),
    ])
    .unwrap();
    assert_eq!(s.proxy.allowed_hosts, ["behest-agent", "agent.ci"]);
    assert_eq!(
        s.proxy.keys_file.unwrap(),
        PathBuf::from("/nonexistent-home/.local/state/behest-agent/keys.json")
    );
}

#[tokio::test]
async fn allowed_hosts_are_accepted_by_the_host_guard_and_other_names_refused() {
    let dir = tempfile::tempdir().unwrap();
    let kf = dir.path().join("keys.json").display().to_string();
    let s = stack_with(
        |_| {},
        &[
            ("BEHEST_AGENT__PROXY__REQUIRE_KEY", "true"),
            ("BEHEST_AGENT__PROXY__KEYS_FILE", kf.as_str()),
            ("BEHEST_AGENT__PROXY__ALLOWED_HOSTS", "behest-agent"),
        ],
    )
    .await;
    let store = behest_agent::keys::KeyStore::open(
        std::path::Path::new(&kf),
        behest_agent::clock::system(),
    )
    .unwrap();
    let (key, _) = store.create(Default::default()).unwrap();
    s.h.remember(&key);
    let url = format!("{}/models", s.base);
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    let status_for = |host: &'static str| {
        let (url, key) = (url.clone(), key.clone());
        async move {
            http()
                .get(url)
                .header("host", host)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // The daemon takes the key written to its file within a second.
    while status_for("behest-agent:8711").await != 200 {
        assert!(tokio::time::Instant::now() < end, "never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status_for("BEHEST-AGENT").await, 200);
    assert_eq!(status_for("evil.example").await, 403);
    assert_eq!(status_for("behest-agent.evil.example").await, 403);
    s.finish().await;
}

#[tokio::test]
async fn exec_without_a_daemon_gives_the_sdk_in_the_command_a_key_and_revokes_it() {
    crate::node::ensure_npm_installed();
    let h = crate::util::Harness::start().await;
    let (upstream, _up) = devkit::upstream::Upstream::start(
        devkit::upstream::UpstreamOptions::for_idp(&h.idp, crate::util::AUDIENCE),
    )
    .await
    .unwrap();
    let keys_file = h.path("state/keys.json");
    let out_file = h.path("sdk.json");
    let kf = keys_file.display().to_string();
    let socket = h.path("nowhere/none.sock").display().to_string();
    // The real SDK inside the command, reading OPENAI_BASE_URL and OPENAI_API_KEY from exec.
    let script = format!(
        "cd {} && printf %s \"$OPENAI_API_KEY\" > {out}.key && node openai-client.mjs \"$OPENAI_BASE_URL\" chat > {out}",
        crate::node::interop_dir().display(),
        out = out_file.display()
    );
    let out = h
        .agent_with_upstream(
            &upstream.base_url(),
            &["exec", "--no-summary", "--", "sh", "-c", &script],
            &[
                ("BEHEST_AGENT__CONTROL__SOCKET", socket.as_str()),
                ("BEHEST_AGENT__PROXY__KEYS_FILE", kf.as_str()),
                ("BEHEST_AGENT__PROXY__REQUIRE_KEY", "true"),
            ],
        )
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let key = std::fs::read_to_string(h.path("sdk.json.key")).unwrap();
    h.remember(&key);
    assert!(key.starts_with("bak_"), "{key}");
    let sdk: Value = serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    assert_eq!(sdk["ok"], true, "{sdk}");
    // Revoked when the command exited: the file holds no key any more.
    let text = std::fs::read_to_string(&keys_file).unwrap();
    let file: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(file["keys"], serde_json::json!([]), "{text}");
    assert!(!text.contains(&key));
    for o in [&out.stdout, &out.stderr] {
        assert!(!String::from_utf8_lossy(o).contains(&key));
    }
}

#[tokio::test]
async fn a_key_bound_to_a_bad_session_is_a_usage_error() {
    let k = keyed().await;
    let out = k.cli(&["key", "create", "--session", "a b"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    assert!(stderr(&out).contains("visible ASCII"), "{}", stderr(&out));
    // So is a bad name, with or without a daemon.
    for socket in [None, Some(k.none_socket())] {
        let args = ["key", "create", "--name", "a\tb"];
        let out = match &socket {
            None => k.cli(&args).await,
            Some(s) => k.cli_on(s, &args).await,
        };
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("control characters"),
            "{}",
            stderr(&out)
        );
    }
}

#[tokio::test]
async fn a_zero_ttl_is_refused_with_what_to_use_and_makes_no_key() {
    let k = keyed().await;
    for args in [
        &["key", "create", "--ttl", "0s"][..],
        &["key", "create", "--ttl", "0"],
        &["env", "--ttl", "0s"],
    ] {
        let out = k.cli(args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(
            stderr(&out).contains("use e.g. 90s, 30m or 12h"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    // Without a daemon, on the file: the same.
    let out = k
        .cli_on(&k.none_socket(), &["key", "create", "--ttl", "0s"])
        .await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // The control API refuses it too.
    let d = behest_agent::control::Daemon::connect(std::path::Path::new(&k.socket), None)
        .await
        .unwrap()
        .unwrap();
    for ttl in ["0", "0s"] {
        let (code, body) = d
            .call(
                http::Method::POST,
                &format!("/v1/keys?ttl={ttl}"),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(code.as_u16(), 400, "{body}");
        assert_eq!(body["error"]["code"], "bad_ttl", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("more than 0"),
            "{body}"
        );
    }
    assert!(k.list().await.is_empty(), "no key was made");
    k.s.finish().await;
}

#[tokio::test]
async fn without_a_daemon_a_key_for_an_unknown_profile_is_refused_naming_the_configured_ones() {
    let k = keyed().await;
    let out = k
        .cli_on(&k.none_socket(), &["key", "create", "--profile", "nope"])
        .await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    assert!(
        stderr(&out).contains("no profile `nope` is configured (profiles: default)"),
        "{}",
        stderr(&out)
    );
    assert!(k.list().await.is_empty(), "no key was made");
    k.s.finish().await;
}
