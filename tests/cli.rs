//! The real binary: one-shot `token` with the disk cache, the daemon and its control socket,
//! `status`, `refresh` (forced grants rationed), exit codes, and no secret on stderr.

use std::process::Stdio;
use std::time::Duration;

use devkit::idp::Fault;
use serde_json::Value;
use tokio::process::Command;

use crate::util::{
    Harness, assert_no_secret_in, eventually, exits_cleanly, mode_of, output, signal,
};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_behest-agent"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// [`bin`] with `dir` as its home and runtime directory: no config file and no daemon found.
fn bin_in(dir: &std::path::Path) -> Command {
    let mut c = bin();
    c.env("HOME", dir).env("XDG_RUNTIME_DIR", dir);
    c
}

#[tokio::test]
async fn parallel_one_shot_token_calls_without_a_daemon_make_one_grant() {
    let h = Harness::start().await;
    let mut runs = Vec::new();
    for _ in 0..8 {
        runs.push(tokio::spawn(output(h.agent(&["token"], &[]))));
    }
    let mut tokens = Vec::new();
    for r in runs {
        let o = r.await.unwrap();
        assert_eq!(o.code, 0, "{}", o.stderr);
        assert_no_secret_in(&o.stderr, std::slice::from_ref(&h.secret), "stderr");
        tokens.push(o.stdout.trim().to_string());
    }
    assert!(
        tokens
            .iter()
            .all(|t| t == &tokens[0] && t.split('.').count() == 3)
    );
    assert_eq!(h.idp.grants(), 1, "one grant for eight parallel calls");
    assert_eq!(mode_of(&h.path("state/token.json")), 0o600);
}

#[tokio::test]
async fn token_json_and_header_formats() {
    let h = Harness::start().await;
    let o = output(h.agent(&["token", "--json"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["claims"]["uid"], h.client_id.as_str());
    assert!(v["expires_at"].as_str().unwrap().ends_with('Z'));
    let token = v["access_token"].as_str().unwrap().to_string();
    let o = output(h.agent(&["token", "--header"], &[])).await;
    assert_eq!(o.stdout.trim(), format!("Authorization: Bearer {token}"));
    assert_eq!(h.idp.grants(), 1, "the second call used the disk cache");
}

#[tokio::test]
async fn token_min_ttl_beyond_what_the_idp_issues_exits_1_with_nothing_on_stdout() {
    let h = Harness::start_with(|o| o.token_ttl = Duration::from_secs(120)).await;
    let o = output(h.agent(&["token", "--min-ttl", "10m"], &[])).await;
    assert_eq!(o.code, 1);
    assert!(o.stdout.is_empty());
    assert!(o.stderr.contains("less than"), "{}", o.stderr);
}

#[tokio::test]
async fn parallel_token_min_ttl_calls_share_one_grant_even_when_it_is_too_short() {
    let parallel = |h: &Harness| {
        let runs: Vec<_> = (0..8)
            .map(|_| tokio::spawn(output(h.agent(&["token", "--min-ttl", "10m"], &[]))))
            .collect();
        async move {
            for r in runs {
                let o = r.await.unwrap();
                assert_eq!(o.code, 1, "{}", o.stderr);
                assert!(o.stderr.contains("less than"), "{}", o.stderr);
            }
        }
    };
    // On an empty cache: one grant for all.
    let h = Harness::start_with(|o| o.token_ttl = Duration::from_secs(120)).await;
    parallel(&h).await;
    assert_eq!(h.idp.grants(), 1, "one grant for eight parallel calls");
    // With a token just cached (the new one expires in the same second as it): one more.
    let h = Harness::start_with(|o| o.token_ttl = Duration::from_secs(120)).await;
    let o = output(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    parallel(&h).await;
    assert_eq!(h.idp.grants(), 2, "one new grant for eight parallel calls");
}

#[tokio::test]
async fn token_min_ttl_longer_than_the_cached_token_makes_one_grant_once_the_idp_issues_longer_ones()
 {
    let h = Harness::start().await;
    // The tenant issues 30 s tokens: one is cached.
    h.idp.fail_next(1, Fault::Ttl(Duration::from_secs(30)));
    let o = output(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(h.idp.grants(), 1);
    // The tenant's token lifetime was raised (the IdP is back to 24 h): the cached token is too
    // short for the caller, so exactly one new grant, whose token is long enough.
    let o = output(h.agent(&["token", "--min-ttl", "60s", "--json"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(h.idp.grants(), 2, "exactly one new grant");
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert!(v["expires_in"].as_u64().unwrap() >= 60, "{}", o.stdout);
    // And it was cached: the next call needs no grant.
    let o = output(h.agent(&["token", "--min-ttl", "60s"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(h.idp.grants(), 2);
}

#[tokio::test]
async fn token_min_ttl_longer_than_the_new_token_too_exits_1_after_exactly_one_grant() {
    let h = Harness::start_with(|o| o.token_ttl = Duration::from_secs(30)).await;
    let o = output(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(h.idp.grants(), 1);
    let o = output(h.agent(&["token", "--min-ttl", "60s"], &[])).await;
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stdout.is_empty(), "{}", o.stdout);
    assert!(
        o.stderr
            .contains("valid for 30s, less than the 1m asked for"),
        "{}",
        o.stderr
    );
    assert_eq!(h.idp.grants(), 2, "one new grant, and only one");
}

#[tokio::test]
async fn configuration_errors_exit_2_and_name_the_key_and_the_file() {
    let h = Harness::start().await;
    let cfg = h.path("config.toml");
    std::fs::write(&cfg, "[auth]\nclient_idd = \"x\"\n").unwrap();
    let o = output(h.agent(&["token", "--config", cfg.to_str().unwrap()], &[])).await;
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr.contains("client_idd") && o.stderr.contains(cfg.to_str().unwrap()),
        "{}",
        o.stderr
    );
    let o = output(h.agent(&["token"], &[("BEHEST_AGENT__AUTH__CLIENT_ID", "")])).await;
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("auth.client_id"), "{}", o.stderr);
    let o = output(h.agent(&["token", "--min-ttl", "soon"], &[])).await;
    assert_eq!(o.code, 2, "usage errors exit 2");
}

/// A `--session` that cannot go into a URL path is a usage error (exit 2) that says what to use.
#[tokio::test]
async fn a_bad_session_flag_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["env", "--session", "a;b$(id)"][..],
        &["env", "--session", "a\nb"],
        &["exec", "--session", "bad session", "--", "true"],
        &["exec", "--session", "", "--", "true"],
        // A client resolves /s/../v1 to /v1: the session would be lost.
        &["exec", "--session", "..", "--", "true"],
        &["env", "--session", "."],
    ] {
        let mut c = bin_in(dir.path());
        c.args(args);
        let o = output(c).await;
        assert_eq!(o.code, 2, "{args:?}: {}", o.stderr);
        assert!(
            o.stderr.contains("use 1 to 128 letters"),
            "{args:?}: {}",
            o.stderr
        );
    }
}

/// `wait --pid` takes a process id: 0 (no process; it was "has exited") and negatives are usage
/// errors.
#[tokio::test]
async fn wait_pid_takes_a_process_id_only() {
    let dir = tempfile::tempdir().unwrap();
    for pid in ["0", "-1", "abc"] {
        let mut c = bin_in(dir.path());
        c.args(["wait", "--timeout", "1s", "--pid", pid]);
        let o = output(c).await;
        assert_eq!(o.code, 2, "{pid}: {}", o.stderr);
        assert!(o.stderr.contains(pid), "{pid}: {}", o.stderr);
    }
}

#[tokio::test]
async fn every_duration_flag_takes_seconds_or_a_duration_and_says_what_to_use_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &'static [&'static str]| {
        let mut c = bin_in(dir.path());
        c.args(args);
        output(c)
    };
    for args in [
        &["wait", "--timeout", "banana"][..],
        &["stop", "--timeout", "banana"],
        &["token", "--min-ttl", "banana"],
        &["dev", "--token-ttl", "banana"],
        &["env", "--ttl", "banana"],
        &["key", "create", "--ttl", "5x"],
    ] {
        let o = run(args).await;
        assert_eq!(o.code, 2, "{args:?}: {}", o.stderr);
        assert!(
            o.stderr
                .contains("is not a duration: use e.g. 90s, 30m or 12h"),
            "{args:?}: {}",
            o.stderr
        );
    }
    // Plain seconds are a duration everywhere: `wait` gets that far and finds no daemon.
    let o = run(&["wait", "--timeout", "1"]).await;
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(!o.stderr.contains("not a duration"), "{}", o.stderr);
}

#[tokio::test]
async fn env_works_with_no_configuration_at_all() {
    let dir = tempfile::tempdir().unwrap();
    // No config file, no AUTH0_* or BEHEST_AGENT__* variables; a runtime directory of its own so
    // no daemon is found.
    let mut c = bin_in(dir.path());
    c.arg("env");
    let o = output(c).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout
            .contains("export OPENAI_BASE_URL='http://127.0.0.1:8711/v1'\n"),
        "{}",
        o.stdout
    );
}

#[tokio::test]
async fn env_takes_proxy_listen_from_a_config_file_that_has_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, "[proxy]\nlisten = \"127.0.0.1:9123\"\n").unwrap();
    let run = |args: &[&str]| {
        let mut c = bin_in(dir.path());
        c.args([
            "env",
            "--format",
            "dotenv",
            "--config",
            cfg.to_str().unwrap(),
        ])
        .args(args);
        output(c)
    };
    let o = run(&[]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout
            .contains("OPENAI_BASE_URL=http://127.0.0.1:9123/v1\n"),
        "{}",
        o.stdout
    );
    let o = run(&["--set", "proxy.listen=127.0.0.1:9124"]).await;
    assert!(
        o.stdout
            .contains("OPENAI_BASE_URL=http://127.0.0.1:9124/v1\n"),
        "{}",
        o.stdout
    );
    // The file is still read as a whole: a typo is still an error.
    std::fs::write(&cfg, "[proxy]\nlistenn = \"127.0.0.1:9123\"\n").unwrap();
    let o = run(&[]).await;
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("listenn"), "{}", o.stderr);
}

#[tokio::test]
async fn usage_and_key_without_a_daemon_need_no_idp_settings() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger/usage.jsonl");
    std::fs::create_dir_all(ledger.parent().unwrap()).unwrap();
    std::fs::write(
        &ledger,
        r#"{"ts":"2026-12-07T00:00:01Z","session":"job-3","profile":"default","model":"m1","path":"/v1/chat/completions","status":200,"prompt_tokens":5,"completion_tokens":2,"total_tokens":7,"duration_ms":3,"request_id":"r1"}
"#,
    )
    .unwrap();
    let keys = dir.path().join("keys/keys.json");
    let set_ledger = format!("usage.ledger_file={}", ledger.display());
    let set_keys = format!("proxy.keys_file={}", keys.display());
    // No [auth] at all, and no daemon (a runtime directory of its own).
    let run = |args: &[&str]| {
        let mut c = bin_in(dir.path());
        c.args(["--set", &set_ledger, "--set", &set_keys])
            .args(args);
        output(c)
    };
    let o = run(&["usage", "--json"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(
        v["sessions"]["job-3"]["models"]["m1"]["total_tokens"], 7,
        "{v}"
    );

    let o = run(&["key", "create", "--name", "ci"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.trim().starts_with("bak_"), "{}", o.stdout);
    assert!(
        o.stderr.contains("proxy.require_key is off"),
        "{}",
        o.stderr
    );
    let o = run(&["key", "list", "--json"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let list: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(list[0]["name"], "ci", "{list}");
    let id = list[0]["id"].as_str().unwrap().to_string();
    let o = run(&["key", "revoke", &id]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);

    // The keys the commands use are still validated, naming the key.
    let o = run(&["--set", "proxy.keys_file=", "key", "list"]).await;
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("proxy.keys_file"), "{}", o.stderr);
    let o = run(&["--set", "usage.ledger_max_size=1", "usage"]).await;
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("usage.ledger_max_size"), "{}", o.stderr);
}

#[tokio::test]
async fn refresh_without_a_daemon_exits_1_with_the_idps_error() {
    let h = Harness::start().await;
    std::fs::write(h.path("client-secret"), "wrong-secret-xyz\n").unwrap();
    let o = output(h.agent(&["refresh"], &[])).await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("invalid_client"), "{}", o.stderr);
}

#[tokio::test]
async fn status_without_a_daemon_shows_one_refresh_point_for_the_cached_token() {
    let h = Harness::start().await;
    assert_eq!(output(h.agent(&["token"], &[])).await.code, 0);
    let next = || async {
        let o = output(h.agent(&["status", "--json"], &[])).await;
        let v: Value = serde_json::from_str(&o.stdout).unwrap();
        v["token"]["next_refresh"].as_str().unwrap().to_string()
    };
    let first = next().await;
    for _ in 0..3 {
        assert_eq!(next().await, first);
    }
}

#[tokio::test]
async fn a_failed_one_shot_token_says_why_once() {
    let h = Harness::start().await;
    std::fs::write(h.path("client-secret"), "wrong-secret-xyz\n").unwrap();
    let o = output(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 1);
    // The engine's retry warning was printed before the command's own error.
    assert_eq!(
        o.stderr.matches("invalid_client").count(),
        1,
        "{}",
        o.stderr
    );
}

#[tokio::test]
async fn one_shot_commands_honour_the_wait_the_idp_told_an_earlier_one() {
    let h = Harness::start().await;
    h.idp.set_fault(Some(Fault::TooManyRequests {
        retry_after: Some(10),
        reset_in: None,
    }));
    let o = output(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert_eq!(h.idp.token_requests(), 1);
    // Within those 10 s: neither `token` nor `refresh` asks again, and they say why.
    for args in [&["token"][..], &["refresh"]] {
        let o = output(h.agent(args, &[])).await;
        assert_eq!(o.code, 1, "{args:?}: {}", o.stderr);
        assert!(
            o.stderr.contains("told an earlier grant to wait"),
            "{}",
            o.stderr
        );
    }
    assert_eq!(h.idp.token_requests(), 1);
    // The IdP is fine again, but the wait is not over. Another secret is another client: it asks
    // at once (and is refused).
    h.idp.set_fault(None);
    std::fs::write(h.path("client-secret"), "another-secret-xyz\n").unwrap();
    let o = output(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert_eq!(h.idp.token_requests(), 2);
    // The right secret asks again only once the wait is over; that grant forgets the wait.
    std::fs::write(h.path("client-secret"), format!("{}\n", h.secret)).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while output(h.agent(&["token"], &[])).await.code != 0 {
        assert!(tokio::time::Instant::now() < deadline, "never asked again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(h.idp.token_requests(), 3, "one grant, after the wait");
    assert!(!h.path("state/token.json.wait").exists());
}

#[tokio::test]
async fn https_to_a_plain_http_idp_says_so() {
    let h = Harness::start().await;
    let https = h.idp.base_url().replace("http://", "https://");
    let o = output(h.agent(&["token"], &[("BEHEST_AGENT__AUTH__DOMAIN", &https)])).await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("speaks plain HTTP"), "{}", o.stderr);
    assert!(!o.stderr.contains("client error ("), "{}", o.stderr);
}

#[tokio::test]
async fn completions_and_version() {
    let o = output({
        let mut c = bin();
        c.args(["completions", "bash"]);
        c
    })
    .await;
    assert_eq!(o.code, 0);
    assert!(o.stdout.contains("behest-agent"));
    // Loaded in bash, it completes a subcommand's options and values, not only its name.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("behest-agent.bash");
    std::fs::write(&script, &o.stdout).unwrap();
    for (words, want) in [
        ("behest-agent to", "token"),
        ("behest-agent token --", "--min-ttl"),
        ("behest-agent env --format ", "dotenv"),
        ("behest-agent key create --", "--session"),
    ] {
        let line = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - {}))\n\
             _behest__agent behest-agent \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"\n\
             echo \"${{COMPREPLY[*]}}\"",
            script.display(),
            if words.ends_with(' ') { 0 } else { 1 }
        );
        let o = output({
            let mut c = Command::new("bash");
            c.arg("-c").arg(line);
            c
        })
        .await;
        assert!(
            o.stdout.contains(want),
            "{words}: {} {}",
            o.stdout,
            o.stderr
        );
    }
    let o = output({
        let mut c = bin();
        c.arg("--version");
        c
    })
    .await;
    assert!(o.stdout.starts_with("behest-agent "), "{}", o.stdout);
}

#[tokio::test]
async fn the_daemon_serves_token_status_and_refresh_over_its_socket_and_stops_on_sigterm() {
    let h = Harness::start().await;
    let mut daemon = h.agent(&["run", "--log-level", "debug"], &[]);
    daemon.stderr(Stdio::piped());
    let mut child = daemon.spawn().unwrap();
    let socket = h.path("run/agent.sock");
    eventually(Duration::from_secs(30), "the control socket", || {
        socket.exists()
    })
    .await;
    assert_eq!(mode_of(&socket), 0o660);
    assert_eq!(mode_of(&h.path("run")) & 0o777, 0o750);

    let o = output(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let token = o.stdout.trim().to_string();
    eventually(Duration::from_secs(10), "the daemon's grant", || {
        h.idp.grants() >= 1
    })
    .await;
    assert_eq!(
        h.idp.grants(),
        1,
        "the CLI asked the daemon, it did not grant itself"
    );

    let o = output(h.agent(&["status", "--json"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(!o.stdout.contains(&token), "status never shows the token");
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["token"]["state"], "valid");
    assert_eq!(v["token"]["claims"]["uid"], h.client_id.as_str());
    assert!(v["token"]["last_error"].is_null());
    assert!(v["token"]["expires_in"].as_i64().unwrap() > 0);
    assert!(v["token"]["last_refresh"].as_str().is_some());

    // A client needs only the socket: no other configuration.
    let mut bare = bin();
    bare.env("BEHEST_AGENT__CONTROL__SOCKET", &socket)
        .args(["status", "--json"]);
    let o = output(bare).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains(&h.client_id));

    let o = output(h.agent(&["status"], &[])).await;
    assert!(
        o.stdout.contains("valid") && o.stdout.contains(&h.client_id),
        "{}",
        o.stdout
    );

    let o = output(h.agent(&["refresh"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(h.idp.grants(), 2);
    let o = output(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let token2 = o.stdout.trim().to_string();

    signal(&child, nix::sys::signal::Signal::SIGTERM);
    exits_cleanly(&mut child).await;
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr)
        .await
        .unwrap();
    assert!(stderr.contains("token ready"), "{stderr}");
    assert_no_secret_in(
        &stderr,
        &[h.secret.clone(), token, token2],
        "the daemon's log",
    );
    assert!(!socket.exists(), "the socket is removed on exit");
}

#[tokio::test]
async fn dev_runs_the_whole_path_on_the_embedded_idp_and_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let mut c = bin();
    c.env("HOME", dir.path()).args([
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--check",
        "--set",
        &format!("control.socket={}", socket.display()),
    ]);
    let o = output(c).await;
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("-> 200 OK"), "{}", o.stdout);
    assert!(o.stdout.contains("(stream) -> 200 OK"), "{}", o.stdout);
    assert!(
        o.stdout.contains("hello from behest-agent dev"),
        "{}",
        o.stdout
    );
    assert!(!o.stderr.contains("eyJ"), "no token in the logs");
}

#[tokio::test]
async fn start_errors_name_the_address_and_the_cause_once() {
    let h = Harness::start().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    // The upstream is never contacted: the start fails first.
    let o = output(h.agent_with_upstream(
        "http://127.0.0.1:9/",
        &["run"],
        &[("BEHEST_AGENT__PROXY__LISTEN", &addr)],
    ))
    .await;
    assert_eq!(o.code, 1, "{}", o.stderr);
    let named = format!("cannot listen on {addr}");
    assert_eq!(o.stderr.matches(&named).count(), 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("in use") && o.stderr.contains("proxy.listen"),
        "names the cause and the key: {}",
        o.stderr
    );
    assert!(
        !h.path("run/agent.sock").exists(),
        "a failed start leaves no control socket behind"
    );

    let file = h.path("a-file");
    std::fs::write(&file, "").unwrap();
    let socket = file.join("agent.sock");
    let o = output(h.agent(
        &["run"],
        &[("BEHEST_AGENT__CONTROL__SOCKET", socket.to_str().unwrap())],
    ))
    .await;
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("cannot bind the control socket"),
        "{}",
        o.stderr
    );
    assert_eq!(
        o.stderr.matches("Not a directory").count(),
        1,
        "{}",
        o.stderr
    );
}

#[tokio::test]
async fn a_refused_token_exits_1_with_nothing_on_stdout_and_the_reason_once() {
    let h = Harness::start().await;
    h.idp
        .set_fault(Some(Fault::WrongUid("someone-else".into())));
    let o = output(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stdout.is_empty(), "{}", o.stdout);
    assert!(o.stderr.contains("refuses"), "{}", o.stderr);
    let last = o.stderr.lines().find(|l| l.starts_with("error: ")).unwrap();
    assert_eq!(last.matches("someone-else").count(), 1, "{}", o.stderr);
}

/// At most one forced grant per 5 s: the bound on grants for calls that took `elapsed`.
fn forced_grant_bound(elapsed: Duration) -> u64 {
    1 + elapsed.as_secs() / 5
}

#[tokio::test]
async fn twenty_one_shot_min_ttl_calls_beyond_the_idps_lifetime_do_not_make_twenty_grants() {
    let h = Harness::start_with(|o| o.token_ttl = Duration::from_secs(120)).await;
    let o = output(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(h.idp.grants(), 1);
    let started = std::time::Instant::now();
    for _ in 0..20 {
        let o = output(h.agent(&["token", "--min-ttl", "10m"], &[])).await;
        assert_eq!(o.code, 1, "{}", o.stderr);
        assert!(o.stderr.contains("less than"), "{}", o.stderr);
    }
    let forced = h.idp.grants() - 1;
    let bound = forced_grant_bound(started.elapsed());
    assert!(
        forced <= bound,
        "{forced} grants for 20 calls in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn twenty_refreshes_through_the_daemon_share_forced_grants() {
    let h = Harness::start().await;
    let mut child = h
        .agent(&["run"], &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let socket = h.path("run/agent.sock");
    eventually(Duration::from_secs(30), "the control socket", || {
        socket.exists()
    })
    .await;
    let o = output(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let before = h.idp.grants();
    let started = std::time::Instant::now();
    for _ in 0..20 {
        let o = output(h.agent(&["refresh"], &[])).await;
        assert_eq!(o.code, 0, "{}", o.stderr);
    }
    let forced = h.idp.grants() - before;
    let bound = forced_grant_bound(started.elapsed());
    assert!(
        (1..=bound).contains(&forced),
        "{forced} grants for 20 refreshes in {:?}",
        started.elapsed()
    );
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    exits_cleanly(&mut child).await;
}

#[tokio::test]
async fn twenty_one_shot_refreshes_share_forced_grants_through_the_cache() {
    let h = Harness::start().await;
    let o = output(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let started = std::time::Instant::now();
    for _ in 0..20 {
        let o = output(h.agent(&["refresh"], &[])).await;
        assert_eq!(o.code, 0, "{}", o.stderr);
    }
    let forced = h.idp.grants() - 1;
    let bound = forced_grant_bound(started.elapsed());
    assert!(
        (1..=bound).contains(&forced),
        "{forced} grants for 20 refreshes in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_configuration_that_does_not_load_is_a_usage_error_not_a_reason_to_try_the_default_socket()
 {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.sock").display().to_string();
    let missing = dir.path().join("missing.toml").display().to_string();
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "[control]\nsockt = \"x\"\n").unwrap();
    let unknown = unknown.display().to_string();
    for config in [&missing, &unknown] {
        for args in [&["stop"][..], &["status"], &["wait", "--timeout", "5s"]] {
            let mut c = bin_in(dir.path());
            c.args(args)
                .env("BEHEST_AGENT_CONFIG", config)
                .env("BEHEST_AGENT__CONTROL__SOCKET", &job);
            let o = output(c).await;
            assert_eq!(o.code, 2, "{args:?} with {config}: {}", o.stderr);
            assert!(o.stderr.contains(config.as_str()), "{args:?}: {}", o.stderr);
            assert!(
                !o.stderr.contains("behest-agent.sock"),
                "{args:?}: {}",
                o.stderr
            );
        }
    }
}

#[tokio::test]
async fn a_log_level_flag_that_is_no_level_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = bin_in(dir.path());
    c.args(["--log-level", "warnn", "status"]);
    let o = output(c).await;
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr.contains("is not a level or filter"),
        "{}",
        o.stderr
    );
}

#[tokio::test]
async fn output_to_a_reader_that_went_away_ends_quietly() {
    for args in [&["completions", "bash"][..], &["--version"]] {
        let mut c = bin();
        c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        // The reader goes away before anything is written (`behest-agent … | head -0`).
        drop(child.stdout.take());
        let o = child.wait_with_output().await.unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        if args[0] == "completions" {
            assert_eq!(o.status.code(), Some(0), "{args:?}: {stderr}");
        }
    }
}

#[tokio::test]
async fn an_empty_behest_agent_config_names_no_file() {
    // An unset CI variable often arrives empty: it is no config file, not a usage error.
    let dir = tempfile::tempdir().unwrap();
    let mut c = bin_in(dir.path());
    c.args(["env", "--format", "dotenv"])
        .env("BEHEST_AGENT_CONFIG", "");
    let o = output(c).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout
            .contains("OPENAI_BASE_URL=http://127.0.0.1:8711/v1"),
        "{}",
        o.stdout
    );
}

/// A config path is any path: one that is not UTF-8 is read (clap refused it as "invalid UTF-8").
#[tokio::test]
async fn a_config_path_that_is_not_utf8_is_read() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir
        .path()
        .join(std::ffi::OsStr::from_bytes(b"caf\xe9.toml"));
    std::fs::write(&path, "[proxy]\nlisten = \"127.0.0.1:9876\"\n").unwrap();
    let mut c = bin_in(dir.path());
    c.args(["env", "--format", "dotenv"])
        .env("BEHEST_AGENT_CONFIG", &path);
    let o = output(c).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("127.0.0.1:9876"), "{}", o.stdout);
}
