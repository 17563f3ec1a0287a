//! `behest-agent doctor`, the real binary against the embedded IdP and echo upstream: one line per
//! check in order, a `fix:` under every ✗, exit 0 only when every check passes (2 when the
//! configuration does not load), no grant when a valid token is at hand, and never a secret or a
//! token in its output.

use std::process::Stdio;
use std::time::Duration;

use devkit::idp::Fault;
use devkit::upstream::{Upstream, UpstreamFault, UpstreamOptions};
use tokio::process::Command;

use crate::util::{AUDIENCE, Harness, Start, assert_no_secret_in, eventually, random, set_mode};

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    async fn of(mut c: Command) -> Out {
        let o = c.output().await.expect("the binary runs");
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// The first line that starts with `prefix`, and its index.
    fn line(&self, prefix: &str) -> (usize, &str) {
        self.stdout
            .lines()
            .enumerate()
            .find(|(_, l)| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{}", self.stdout))
    }

    /// The lines that follow the first one starting with `prefix`, up to the next check.
    fn fix_after(&self, prefix: &str) -> String {
        let (i, _) = self.line(prefix);
        let rest: Vec<&str> = self
            .stdout
            .lines()
            .skip(i + 1)
            .take_while(|l| l.starts_with("  "))
            .collect();
        assert!(
            rest.first().is_some_and(|l| l.starts_with("  fix: ")),
            "no fix under {prefix:?} in:\n{}",
            self.stdout
        );
        rest.join("\n")
    }

    /// Neither the given secrets nor any JWT (they all start `eyJ`) on stdout or stderr.
    fn assert_no_secrets(&self, secrets: &[String]) {
        for (text, what) in [
            (&self.stdout, "doctor's stdout"),
            (&self.stderr, "doctor's stderr"),
        ] {
            assert_no_secret_in(text, secrets, what);
            assert!(!text.contains("eyJ"), "{what} shows a token:\n{text}");
        }
    }
}

#[tokio::test]
async fn doctor_passes_every_check_in_order_against_a_healthy_idp_and_upstream_and_exits_0() {
    let h = Harness::start().await;
    let (upstream, _stop) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
        .await
        .expect("the upstream starts");
    let base = upstream.base_url();
    let o = Out::of(h.agent(
        &["doctor"],
        &[
            ("BEHEST_AGENT__PROXY__UPSTREAM", &base),
            ("BEHEST_AGENT__PROXY__ALLOW_INSECURE_UPSTREAM", "true"),
        ],
    ))
    .await;
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert!(!o.stdout.contains('✗'), "{}", o.stdout);
    let order = [
        "✓ config: environment only".to_string(),
        "✓ client secret: ".to_string(),
        "✓ client secret file permissions: mode 0600".to_string(),
        "✓ token endpoint: ".to_string(),
        "✓ JWKS: ".to_string(),
        "✓ grant: ".to_string(),
        "✓ signature: verified".to_string(),
        "✓ exp: expires in ".to_string(),
        format!("✓ aud: includes {AUDIENCE}"),
        format!("✓ iss: {}", h.idp.issuer()),
        format!("✓ client: {}", h.client_id),
        format!("✓ uid: {} (the client id)", h.client_id),
        "✓ tid: dev-tenant".to_string(),
        "✓ pid: dev-project".to_string(),
        "✓ tier: dev".to_string(),
        "· daemon: not running".to_string(),
        "✓ token cache: ".to_string(),
        format!("✓ upstream: GET {base}/v1/models → 200 OK"),
    ];
    let at: Vec<usize> = order.iter().map(|p| o.line(p).0).collect();
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "out of order:\n{}",
        o.stdout
    );
    assert_eq!(h.idp.grants(), 1, "one grant, for lack of a cached token");
    assert!(
        !h.path("state/token.json").exists(),
        "doctor never writes the disk cache"
    );
    assert_eq!(upstream.request_count(), 1);
    o.assert_no_secrets(std::slice::from_ref(&h.secret));
}

/// `doctor | head -1`: the reader goes after the first line; doctor still ends with its own
/// exit code, not a panic's 101.
#[tokio::test]
async fn a_reader_that_goes_away_does_not_make_doctor_panic() {
    let h = Harness::start().await;
    let mut c = h.agent(&["doctor"], &[]);
    c.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    drop(child.stdout.take());
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("doctor ends")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{:?}: {stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `doctor > /dev/full`: its report is lost, which is no pass (as for every printing command).
#[tokio::test]
async fn a_report_that_cannot_be_written_exits_1() {
    let h = Harness::start().await;
    let mut c = h.agent(&["doctor"], &[]);
    c.stdout(
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap(),
    )
    .stderr(Stdio::piped());
    // (tokio's `output()` would pipe stdout whatever was set: spawn it.)
    let o = tokio::time::timeout(
        Duration::from_secs(60),
        c.spawn().unwrap().wait_with_output(),
    )
    .await
    .expect("doctor ends")
    .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot write the output"), "{stderr}");
}

#[tokio::test]
async fn a_token_without_uid_fails_the_uid_check_with_the_auth0_action_as_fix_and_exits_1() {
    let h = Harness::start().await;
    h.idp.set_fault(Some(Fault::MissingUid));
    let o = Out::of(h.agent(&["doctor"], &[])).await;
    assert_eq!(o.code, 1, "{}\n{}", o.stdout, o.stderr);
    o.line("✓ signature: verified");
    let (_, uid) = o.line("✗ uid: ");
    assert!(uid.contains("no `uid` claim"), "{uid}");
    let fix = o.fix_after("✗ uid: ");
    assert!(
        fix.contains("exports.onExecuteCredentialsExchange")
            && fix.contains(r#"api.accessToken.setCustomClaim("uid", event.client.client_id);"#),
        "{fix}"
    );
    // The other claims are still reported, and the refused token is never sent upstream.
    o.line("✓ tid: dev-tenant");
    o.line("✓ exp: ");
    o.assert_no_secrets(std::slice::from_ref(&h.secret));
}

#[tokio::test]
async fn missing_tid_and_pid_fail_with_set_custom_claim_as_the_fix() {
    let h = Harness::start().await;
    h.idp.set_fault(Some(Fault::MissingTidPid));
    let o = Out::of(h.agent(&["doctor"], &[])).await;
    assert_eq!(o.code, 1, "{}\n{}", o.stdout, o.stderr);
    for claim in ["tid", "pid"] {
        let fix = o.fix_after(&format!("✗ {claim}: "));
        assert!(
            fix.contains(&format!("api.accessToken.setCustomClaim(\"{claim}\"")),
            "{fix}"
        );
    }
    o.line("✓ tier: dev");
    o.line(&format!("✓ uid: {}", h.client_id));
    o.assert_no_secrets(std::slice::from_ref(&h.secret));
}

#[tokio::test]
async fn an_upstream_refusing_the_token_fails_with_401_and_a_fix_naming_the_audience() {
    let h = Harness::start().await;
    let (upstream, _stop) = Upstream::start(UpstreamOptions::for_idp(&h.idp, AUDIENCE))
        .await
        .expect("the upstream starts");
    upstream.set_fault(Some(UpstreamFault::Unauthorized));
    let base = upstream.base_url();
    let o = Out::of(h.agent(
        &["doctor"],
        &[
            ("BEHEST_AGENT__PROXY__UPSTREAM", &base),
            ("BEHEST_AGENT__PROXY__ALLOW_INSECURE_UPSTREAM", "true"),
        ],
    ))
    .await;
    assert_eq!(o.code, 1, "{}\n{}", o.stdout, o.stderr);
    let prefix = format!("✗ upstream GET {base}/v1/models: HTTP 401");
    o.line(&prefix);
    assert!(
        o.fix_after(&prefix).contains("auth.audience"),
        "{}",
        o.stdout
    );
    o.assert_no_secrets(std::slice::from_ref(&h.secret));
}

#[tokio::test]
async fn a_wrong_client_secret_fails_the_grant_with_invalid_client_and_its_fix() {
    let h = Harness::start().await;
    let wrong = format!("wrong-{}", random(24));
    std::fs::write(h.path("client-secret"), format!("{wrong}\n")).unwrap();
    let o = Out::of(h.agent(&["doctor"], &[])).await;
    assert_eq!(o.code, 1, "{}\n{}", o.stdout, o.stderr);
    let (_, grant) = o.line("✗ grant: ");
    assert!(grant.contains("invalid_client"), "{grant}");
    let fix = o.fix_after("✗ grant: ");
    assert!(
        fix.contains("auth.client_id") && fix.contains(&h.client_id),
        "{fix}"
    );
    o.assert_no_secrets(&[h.secret.clone(), wrong]);
}

/// Auth0 answers a wrong secret with 401 `access_denied` "Unauthorized": the fix is about the
/// credentials, where 403 `access_denied` is about the API.
#[tokio::test]
async fn a_401_access_denied_is_fixed_by_the_credentials_and_a_403_by_the_api() {
    let h = Harness::start().await;
    let refuse = |status: u16, description: &str| Fault::Oauth {
        status,
        error: "access_denied".into(),
        description: description.into(),
    };
    h.idp.set_fault(Some(refuse(401, "Unauthorized")));
    let o = Out::of(h.agent(&["doctor"], &[])).await;
    assert_eq!(o.code, 1, "{}\n{}", o.stdout, o.stderr);
    let fix = o.fix_after("✗ grant: ");
    assert!(
        fix.contains("Client Secret") && fix.contains(&h.client_id),
        "{fix}"
    );
    assert!(!fix.contains("auth.audience"), "{fix}");
    let o = Out::of(h.agent(&["token"], &[])).await;
    assert!(o.stderr.contains("Client Secret"), "{}", o.stderr);
    // A 401 without an OAuth2 body is about the credentials too (RFC 6749 §5.2).
    h.idp.set_fault(Some(Fault::Status(401)));
    let o = Out::of(h.agent(&["token"], &[])).await;
    assert!(o.stderr.contains("Client Secret"), "{}", o.stderr);

    h.idp
        .set_fault(Some(refuse(403, "Service not found: https://nope")));
    let o = Out::of(h.agent(&["doctor"], &[])).await;
    let fix = o.fix_after("✗ grant: ");
    assert!(
        fix.contains("auth.audience") && fix.contains(AUDIENCE),
        "{fix}"
    );
}

#[tokio::test]
async fn while_the_idp_asks_to_wait_doctor_does_not_ask_it_again() {
    let h = Harness::start().await;
    h.idp.set_fault(Some(Fault::TooManyRequests {
        retry_after: Some(600),
        reset_in: None,
    }));
    let o = Out::of(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 1, "{}", o.stderr);
    let asked = h.idp.token_requests();
    let o = Out::of(h.agent(&["doctor"], &[])).await;
    assert_eq!(o.code, 1, "{}\n{}", o.stdout, o.stderr);
    let (_, grant) = o.line("✗ grant: ");
    assert!(
        grant.contains("not tried") && grant.contains("too_many_requests"),
        "{grant}"
    );
    assert_eq!(h.idp.token_requests(), asked);
}

#[tokio::test]
async fn a_secret_file_readable_by_others_fails_the_permission_check_with_chmod_600() {
    let h = Harness::start().await;
    let secret_file = h.path("client-secret");
    set_mode(&secret_file, 0o644);
    let o = Out::of(h.agent(&["doctor"], &[])).await;
    assert_eq!(o.code, 1, "{}\n{}", o.stdout, o.stderr);
    let (_, line) = o.line("✗ client secret file permissions: ");
    assert!(line.contains("0644"), "{line}");
    assert_eq!(
        o.fix_after("✗ client secret file permissions: "),
        format!("  fix: chmod 600 {}", secret_file.display())
    );
    assert_eq!(
        o.stdout.matches('✗').count(),
        1,
        "only the permissions fail:\n{}",
        o.stdout
    );
    o.assert_no_secrets(std::slice::from_ref(&h.secret));
}

#[tokio::test]
async fn a_secret_file_with_a_second_line_is_named_by_doctor_without_showing_it() {
    let h = Harness::start().await;
    std::fs::write(
        h.path("client-secret"),
        format!("{}\nold-secret-line\n", h.secret),
    )
    .unwrap();
    let o = Out::of(h.agent(&["doctor"], &[])).await;
    assert_eq!(o.code, 2, "{}\n{}", o.stdout, o.stderr);
    let (_, line) = o.line("✗ config: ");
    assert!(
        line.contains("auth.client_secret_file") && line.contains("more than one line"),
        "{}",
        o.stdout
    );
    assert_eq!(
        h.idp.token_requests(),
        0,
        "no grant with a secret that cannot be right"
    );
    o.assert_no_secrets(&[h.secret.clone(), "old-secret-line".to_string()]);
}

#[tokio::test]
async fn a_configuration_that_does_not_load_prints_its_error_as_the_first_line_and_exits_2() {
    let h = Harness::start().await;
    let cfg = h.path("config.toml");
    std::fs::write(&cfg, "[auth]\nclient_idd = \"x\"\n").unwrap();
    let o = Out::of(h.agent(&["doctor", "--config", cfg.to_str().unwrap()], &[])).await;
    assert_eq!(o.code, 2, "{}\n{}", o.stdout, o.stderr);
    let first = o.stdout.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("✗ config: ")
            && first.contains("client_idd")
            && first.contains(cfg.to_str().unwrap()),
        "{}",
        o.stdout
    );
    o.fix_after("✗ config: ");
    assert_eq!(h.idp.token_requests(), 0);
    o.assert_no_secrets(std::slice::from_ref(&h.secret));
}

/// Without a config file, an environment variable that does not load is said once, on the config
/// line with its fix; and text that opens a JSON list must be one (not read as the items `["tid"`
/// and `1]`).
#[tokio::test]
async fn a_bad_environment_value_is_said_once_and_a_broken_json_list_is_refused() {
    let h = Harness::start().await;
    let var = "BEHEST_AGENT__TOKEN__REQUIRED_CLAIMS";
    let o = Out::of(h.agent(&["doctor"], &[(var, r#"["tid",1]"#)])).await;
    assert_eq!(o.code, 2, "{}\n{}", o.stdout, o.stderr);
    let first = o.stdout.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("✗ config: ") && first.contains(var) && first.contains("JSON list"),
        "{}",
        o.stdout
    );
    assert!(!o.stdout.contains("✗ daemon"), "{}", o.stdout);
    assert!(
        !o.fix_after("✗ config: ").trim().ends_with("fix:"),
        "{}",
        o.stdout
    );
}

/// Behind an egress proxy that cannot be reached, the IdP checks name the proxy, as `token` does.
#[tokio::test]
async fn idp_checks_through_an_unreachable_egress_proxy_name_it() {
    let h = Harness::start().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let proxy = format!("http://127.0.0.1:{port}");
    let o = Out::of(h.agent(
        &["doctor"],
        &[
            ("BEHEST_AGENT__EGRESS__PROXY", &proxy),
            ("BEHEST_AGENT__EGRESS__NO_PROXY", "none.invalid"),
        ],
    ))
    .await;
    assert_eq!(o.code, 1, "{}", o.stdout);
    for check in ["✗ token endpoint: ", "✗ JWKS: "] {
        let (_, line) = o.line(check);
        assert!(
            line.contains(&format!("through the egress proxy {proxy}")),
            "{line}"
        );
    }
}

#[tokio::test]
async fn a_valid_cached_token_is_checked_without_a_grant() {
    let h = Harness::start().await;
    let o = Out::of(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let token = o.stdout.trim().to_string();
    assert_eq!(h.idp.grants(), 1);

    let o = Out::of(h.agent(&["doctor"], &[])).await;
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    o.line("✓ token: a valid one from the disk cache");
    o.line(&format!("✓ uid: {}", h.client_id));
    assert!(!o.stdout.contains("grant:"), "{}", o.stdout);
    assert_eq!(h.idp.grants(), 1, "doctor spent no grant");
    assert_eq!(h.idp.token_requests(), 1);
    o.assert_no_secrets(&[h.secret.clone(), token]);
}

/// A cached token signed with a key the IdP has since withdrawn: the fix is to delete the cache,
/// not to point auth.domain at another IdP (what an unknown key means for a new grant).
#[tokio::test]
async fn a_cached_token_whose_key_was_withdrawn_is_named_with_the_cache_to_delete() {
    let h = Harness::start().await;
    let o = Out::of(h.agent(&["token"], &[])).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    h.idp.rotate_key(false);
    let o = Out::of(h.agent(&["doctor"], &[])).await;
    assert_eq!(o.code, 1, "{}\n{}", o.stdout, o.stderr);
    o.line("✗ signature: the cached token does not verify against the IdP's keys now");
    let fix = o.fix_after("✗ signature");
    assert!(
        fix.contains("delete") && fix.contains("token.json"),
        "{fix}"
    );
    assert!(!fix.contains("auth.domain"), "{fix}");
}

#[tokio::test]
async fn a_running_daemon_is_reported_with_its_pid_and_socket_mode_and_lends_its_token() {
    let h = Harness::start().await;
    // No disk cache: the token can only come from the daemon or a grant.
    let no_cache = [("BEHEST_AGENT__TOKEN__CACHE_FILE", "")];
    let mut daemon = h.agent(&["run"], &no_cache);
    daemon.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = daemon.spawn().unwrap();
    let socket = h.path("run/agent.sock");
    eventually(Duration::from_secs(30), "the daemon's token", || {
        socket.exists() && h.idp.grants() == 1
    })
    .await;
    let ready = Out::of(h.agent(&["status"], &no_cache)).await;
    assert_eq!(ready.code, 0, "{}", ready.stdout);

    let o = Out::of(h.agent(&["doctor"], &no_cache)).await;
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    o.line("✓ token: the running daemon's (no grant made)");
    let (_, line) = o.line("✓ daemon: pid ");
    assert!(line.contains(&child.id().unwrap().to_string()), "{line}");
    o.line(&format!("✓ control socket: {} mode 0660", socket.display()));
    assert_eq!(h.idp.grants(), 1, "doctor used the daemon's token");
    o.assert_no_secrets(std::slice::from_ref(&h.secret));

    // Its next grant fails (the secret rotated wrong): its token still serves, but doctor says
    // so (it passed every check).
    h.idp.set_fault(Some(Fault::Oauth {
        status: 401,
        error: "invalid_client".into(),
        description: "wrong secret".into(),
    }));
    let refresh = Out::of(h.agent(&["refresh"], &no_cache)).await;
    assert_eq!(refresh.code, 1, "{}", refresh.stderr);
    let o = Out::of(h.agent(&["doctor"], &no_cache)).await;
    assert_eq!(o.code, 1, "{}\n{}", o.stdout, o.stderr);
    let (_, line) = o.line("✗ daemon's last grant: it failed");
    assert!(line.contains("invalid_client"), "{line}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
}

#[tokio::test]
async fn doctor_prints_the_same_fix_for_a_refused_grant_as_the_cli_error_carries() {
    let h = Harness::start().await;
    h.idp.set_fault(Some(Fault::Oauth {
        status: 403,
        error: "unauthorized_client".into(),
        description: "Grant type 'client_credentials' not allowed for the client.".into(),
    }));
    let o = Out::of(h.agent(&["doctor"], &[])).await;
    assert_eq!(o.code, 1, "{}\n{}", o.stdout, o.stderr);
    let fix = o.fix_after("✗ grant: ");
    let fix = fix.strip_prefix("  fix: ").unwrap();
    assert!(fix.contains("Grant Types > Client Credentials"), "{fix}");
    let refresh = Out::of(h.agent(&["refresh"], &[])).await;
    assert_eq!(refresh.code, 1, "{}", refresh.stderr);
    assert!(
        refresh.stderr.contains("unauthorized_client") && refresh.stderr.contains(fix),
        "doctor's fix {fix:?} is not in the error:\n{}",
        refresh.stderr
    );
    o.assert_no_secrets(std::slice::from_ref(&h.secret));
}

#[tokio::test]
async fn a_token_cache_that_cannot_be_written_fails_with_a_fix() {
    let h = Harness::start().await;
    let file = h.path("a-file");
    std::fs::write(&file, "").unwrap();
    let cache = file.join("token.json");
    let o = Out::of(h.agent(
        &["doctor"],
        &[("BEHEST_AGENT__TOKEN__CACHE_FILE", cache.to_str().unwrap())],
    ))
    .await;
    assert_eq!(o.code, 1, "{}\n{}", o.stdout, o.stderr);
    let (_, line) = o.line("✗ token cache: ");
    assert!(line.contains("token.json"), "{line}");
    let fix = o.fix_after("✗ token cache: ");
    assert!(fix.contains("writable"), "{fix}");
    o.assert_no_secrets(std::slice::from_ref(&h.secret));
}
