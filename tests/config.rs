//! Configuration loading: layering, fallbacks, and errors that name the key and the file.

use std::collections::HashMap;
use std::time::Duration;

use behest_agent::config::{self, ConfigError, Endpoints, ListenAddr, LoadOptions, Provider};

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn load_file(
    toml: &str,
    pairs: &[(&str, &str)],
) -> (tempfile::TempDir, Result<config::Settings, ConfigError>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml).unwrap();
    let r = config::load(&LoadOptions {
        path: Some(path),
        default_path: None,
        env: env(pairs),
        overrides: vec![],
    });
    (dir, r)
}

const MINIMAL: &str = r#"
[auth]
domain = "example.eu.auth0.com"
client_id = "abc123"
audience = "https://api.behest.app"
"#;

#[test]
fn auth0_domain_derives_token_issuer_and_jwks_urls() {
    let (_d, s) = load_file(MINIMAL, &[("AUTH0_CLIENT_SECRET", "s3cret-value")]);
    let s = s.unwrap();
    assert_eq!(s.auth.provider, Provider::Auth0);
    match &s.auth.endpoints {
        Endpoints::Fixed {
            issuer,
            token_url,
            jwks_url,
        } => {
            assert_eq!(issuer.as_deref(), Some("https://example.eu.auth0.com/"));
            assert_eq!(
                token_url.as_str(),
                "https://example.eu.auth0.com/oauth/token"
            );
            assert_eq!(
                jwks_url.as_ref().unwrap().as_str(),
                "https://example.eu.auth0.com/.well-known/jwks.json"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.token.expected_uid, "abc123");
    assert_eq!(
        s.proxy.listen,
        vec![ListenAddr::Tcp("127.0.0.1:8711".parse().unwrap())]
    );
    assert_eq!(s.proxy.max_replay_body, 1 << 20);
    assert_eq!(s.proxy.replay_budget, 64 << 20);
    assert_eq!(s.proxy.max_upstream_connections, s.proxy.max_connections);
    assert_eq!(s.proxy.upstream_timeout, Duration::from_secs(600));
}

#[test]
fn environment_overrides_the_file_and_auth0_variables_are_fallbacks() {
    let (_d, s) = load_file(
        MINIMAL,
        &[
            ("BEHEST_AGENT__AUTH__CLIENT_ID", "from-env"),
            ("BEHEST_AGENT__TOKEN__REFRESH_MARGIN", "90s"),
            (
                "BEHEST_AGENT__PROXY__LISTEN",
                "127.0.0.1:9001,unix:/tmp/x.sock",
            ),
            ("AUTH0_CLIENT_ID", "ignored-because-set"),
            ("AUTH0_CLIENT_SECRET", "s3cret-value"),
            ("BEHEST_BASE_URL", "https://gateway.behest.app"),
        ],
    );
    let s = s.unwrap();
    assert_eq!(s.auth.client_id, "from-env");
    assert_eq!(s.token.refresh_margin, Duration::from_secs(90));
    assert_eq!(s.proxy.listen.len(), 2);
    assert_eq!(
        s.proxy.upstream.unwrap().as_str(),
        "https://gateway.behest.app/"
    );

    let s = config::load(&LoadOptions {
        path: None,
        default_path: None,
        env: env(&[
            ("AUTH0_DOMAIN", "t.auth0.com"),
            ("AUTH0_AUDIENCE", "https://api"),
            ("AUTH0_CLIENT_ID", "cid"),
            ("AUTH0_CLIENT_SECRET", "s3cret-value"),
        ]),
        overrides: vec![("token.uid_check".into(), "warn".into())],
    })
    .unwrap();
    assert_eq!(s.auth.client_id, "cid");
    assert_eq!(s.auth.audience.as_deref(), Some("https://api"));
    assert_eq!(s.token.uid_check, config::UidCheck::Warn);
}

#[test]
fn an_unknown_key_is_an_error_naming_the_key_and_the_file() {
    let (d, r) = load_file(
        &format!("{MINIMAL}\n[proxy]\nlisten_addr = \"x\"\n"),
        &[("AUTH0_CLIENT_SECRET", "s3cret-value")],
    );
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("listen_addr"), "{msg}");
    assert!(
        msg.contains(&d.path().join("config.toml").display().to_string()),
        "{msg}"
    );
    // One from the environment is named by its variable, not by the file.
    for var in [
        "BEHEST_AGENT__FLEET__REDIS_URLL",
        "BEHEST_AGENT__FLET__REDIS_URL",
    ] {
        let (d, r) = load_file(
            MINIMAL,
            &[("AUTH0_CLIENT_SECRET", "s3cret-value"), (var, "redis://x")],
        );
        let msg = r.unwrap_err().to_string();
        assert!(
            msg.contains(&format!("environment variable {var}")),
            "{msg}"
        );
        assert!(
            !msg.contains(&d.path().join("config.toml").display().to_string()),
            "{msg}"
        );
    }
    // And one given with --set by that flag.
    for key in ["auth.audiance", "nosuch.key"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let msg = config::load(&LoadOptions {
            path: Some(path.clone()),
            default_path: None,
            env: env(&[("AUTH0_CLIENT_SECRET", "s3cret-value")]),
            overrides: vec![(key.to_string(), "x".to_string())],
        })
        .unwrap_err()
        .to_string();
        assert!(msg.contains(&format!("--set {key}")), "{msg}");
        assert!(!msg.contains(&path.display().to_string()), "{msg}");
    }
}

#[test]
fn missing_required_keys_name_the_key_and_how_to_fix_it() {
    let (_d, r) = load_file(
        "[auth]\ndomain = \"x.auth0.com\"\naudience = \"https://a\"\n",
        &[("AUTH0_CLIENT_SECRET", "s3cret-value")],
    );
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains("auth.client_id") && msg.contains("AUTH0_CLIENT_ID"),
        "{msg}"
    );
    let (_d, r) = load_file(MINIMAL, &[]);
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("client_secret_file"), "{msg}");
    let (_d, r) = load_file(
        "[auth]\ndomain = \"x.auth0.com\"\nclient_id = \"c\"\n",
        &[("AUTH0_CLIENT_SECRET", "s3cret-value")],
    );
    assert!(r.unwrap_err().to_string().contains("auth.audience"));
}

#[test]
fn bad_urls_and_plain_http_to_remote_hosts_are_refused() {
    let (_d, r) = load_file(
        &MINIMAL.replace("example.eu.auth0.com", "http://idp.example.com"),
        &[("AUTH0_CLIENT_SECRET", "s3cret-value")],
    );
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains("auth.domain") && msg.contains("https"),
        "{msg}"
    );
    let (_d, r) = load_file(
        &MINIMAL.replace("example.eu.auth0.com", "http://127.0.0.1:9000"),
        &[("AUTH0_CLIENT_SECRET", "s3cret-value")],
    );
    assert!(r.is_ok(), "plain http is fine on loopback");
    let (_d, r) = load_file(
        &format!("{MINIMAL}[proxy]\nupstream = \"http://gateway.example.com\"\n"),
        &[("AUTH0_CLIENT_SECRET", "s3cret-value")],
    );
    assert!(r.unwrap_err().to_string().contains("proxy.upstream"));
}

/// A user and password in an IdP URL would go out and into every log line that names it.
#[test]
fn idp_urls_with_a_user_or_password_are_refused_without_quoting_them() {
    let oidc =
        "[auth]\nprovider = \"oidc\"\nclient_id = \"c\"\naudience = \"https://api.example\"\n";
    for (toml, key) in [
        (
            MINIMAL.replace("example.eu.auth0.com", "https://user:hunter2@idp.example"),
            "auth.domain",
        ),
        (
            format!("{oidc}issuer = \"https://user:hunter2@idp.example/\"\n"),
            "auth.issuer",
        ),
        (
            format!(
                "{oidc}token_url = \"https://user:hunter2@idp.example/token\"\njwks_url = \"https://idp.example/jwks\"\n"
            ),
            "auth.token_url",
        ),
    ] {
        let (_d, r) = load_file(&toml, &[("AUTH0_CLIENT_SECRET", "s3cret-value")]);
        let msg = r.expect_err(key).to_string();
        assert!(
            msg.contains(key) && msg.contains("user or password"),
            "{msg}"
        );
        assert!(!msg.contains("hunter2"), "{msg}");
    }
    // A tenant's domain has no query to drop silently.
    let (_d, r) = load_file(
        &MINIMAL.replace("example.eu.auth0.com", "https://idp.example/p?x=1"),
        &[("AUTH0_CLIENT_SECRET", "s3cret-value")],
    );
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains("auth.domain") && msg.contains("query"),
        "{msg}"
    );
    // Nor a path: the token endpoint was asked at /oauth/token/oauth/token, and the 404 blamed
    // the tenant's settings.
    let (_d, r) = load_file(
        &MINIMAL.replace("example.eu.auth0.com", "https://idp.example/oauth/token"),
        &[("AUTH0_CLIENT_SECRET", "s3cret-value")],
    );
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains("auth.domain") && msg.contains("has a path (/oauth/token)"),
        "{msg}"
    );
}

#[test]
fn an_unreadable_secret_file_is_an_error_naming_the_key_and_the_path() {
    let (_d, r) = load_file(
        &format!("{MINIMAL}client_secret_file = \"/nonexistent/secret\"\n"),
        &[],
    );
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains("auth.client_secret_file") && msg.contains("/nonexistent/secret"),
        "{msg}"
    );
}

#[test]
fn a_non_loopback_listen_address_needs_allow_remote() {
    let (_d, r) = load_file(
        &format!("{MINIMAL}[proxy]\nlisten = \"0.0.0.0:8711\"\n"),
        &[("AUTH0_CLIENT_SECRET", "s3cret-value")],
    );
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains("proxy.listen") && msg.contains("allow_remote"),
        "{msg}"
    );
    let (_d, r) = load_file(
        &format!("{MINIMAL}[proxy]\nlisten = \"0.0.0.0:8711\"\nallow_remote = true\n"),
        &[("AUTH0_CLIENT_SECRET", "s3cret-value")],
    );
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("proxy.require_key"), "{msg}");
    let (_d, r) = load_file(
        &format!(
            "{MINIMAL}[proxy]\nlisten = \"0.0.0.0:8711\"\nallow_remote = true\nrequire_key = true\nkeys_file = \"/var/lib/behest-agent/keys.json\"\n"
        ),
        &[("AUTH0_CLIENT_SECRET", "s3cret-value")],
    );
    assert!(r.is_ok(), "{r:?}");
}

#[test]
fn proxy_listen_alone_needs_no_auth_section_and_keeps_the_loopback_rule() {
    let listen = |toml: Option<&str>, pairs: &[(&str, &str)]| {
        let dir = tempfile::tempdir().unwrap();
        let path = toml.map(|t| {
            let p = dir.path().join("config.toml");
            std::fs::write(&p, t).unwrap();
            p
        });
        config::proxy_listen(&LoadOptions {
            path,
            default_path: None,
            env: env(pairs),
            overrides: vec![],
        })
    };
    assert_eq!(
        listen(None, &[]).unwrap(),
        vec![ListenAddr::Tcp("127.0.0.1:8711".parse().unwrap())]
    );
    assert_eq!(
        listen(
            Some("[proxy]\nlisten = \"127.0.0.1:9000\"\n"),
            &[("BEHEST_AGENT__PROXY__LISTEN", "127.0.0.1:9001")]
        )
        .unwrap(),
        vec![ListenAddr::Tcp("127.0.0.1:9001".parse().unwrap())]
    );
    let msg = listen(Some("[proxy]\nlisten = \"0.0.0.0:8711\"\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("proxy.listen") && msg.contains("allow_remote"),
        "{msg}"
    );
}

#[test]
fn oidc_with_only_an_issuer_uses_discovery() {
    let s = config::load(&LoadOptions {
        path: None,
        default_path: None,
        env: env(&[
            (
                "BEHEST_AGENT__AUTH__ISSUER",
                "https://login.example.com/realms/ci",
            ),
            ("BEHEST_AGENT__AUTH__CLIENT_ID", "cid"),
            ("BEHEST_AGENT_CLIENT_SECRET", "s3cret-value"),
        ]),
        overrides: vec![],
    })
    .unwrap();
    assert_eq!(s.auth.provider, Provider::Oidc);
    assert!(matches!(s.auth.endpoints, Endpoints::Discover { .. }));
}

#[test]
fn durations_and_sizes_are_human_strings_and_bad_ones_name_the_key() {
    let (_d, r) = load_file(
        &format!("{MINIMAL}[token]\nrefresh_margin = \"soon\"\n"),
        &[("AUTH0_CLIENT_SECRET", "s3cret-value")],
    );
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("refresh_margin"), "{msg}");
    let (_d, r) = load_file(
        &format!("{MINIMAL}[proxy]\nmax_replay_body = \"2MiB\"\nidle_timeout = \"1h\"\n"),
        &[("AUTH0_CLIENT_SECRET", "s3cret-value")],
    );
    let s = r.unwrap();
    assert_eq!(s.proxy.max_replay_body, 2 << 20);
    assert_eq!(s.proxy.idle_timeout, Duration::from_secs(3600));
    let (_d, r) = load_file(
        &format!("{MINIMAL}[proxy]\nreplay_budget = \"8MiB\"\nmax_upstream_connections = 10\n"),
        &[("AUTH0_CLIENT_SECRET", "s3cret-value")],
    );
    let s = r.unwrap();
    assert_eq!(s.proxy.replay_budget, 8 << 20);
    assert_eq!(s.proxy.max_upstream_connections, 10);
    let (_d, r) = load_file(
        &format!("{MINIMAL}[proxy]\nreplay_budget = \"plenty\"\n"),
        &[("AUTH0_CLIENT_SECRET", "s3cret-value")],
    );
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("proxy.replay_budget"), "{msg}");
}

#[test]
fn the_documented_example_config_is_valid_and_complete() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/behest-agent.toml");
    let r = config::load(&LoadOptions {
        path: Some(path),
        default_path: None,
        env: env(&[("AUTH0_CLIENT_SECRET", "s3cret-value")]),
        overrides: vec![],
    });
    let s = r.expect("config/behest-agent.toml loads");
    // A user's first start with it is quiet: it sets no key the agent would warn about.
    assert!(
        !s.warnings.iter().any(|w| w.contains("is set but not used")),
        "{:?}",
        s.warnings
    );
}

fn load_with(toml: &str, pairs: &[(&str, &str)]) -> Result<config::Settings, ConfigError> {
    let mut pairs = pairs.to_vec();
    pairs.push(("AUTH0_CLIENT_SECRET", "s3cret-value"));
    load_file(&format!("{MINIMAL}{toml}"), &pairs).1
}

#[test]
fn a_duration_without_a_unit_is_refused_with_the_unit_it_needs() {
    for (toml, env) in [
        ("[token]\nrefresh_margin = 300\n", vec![]),
        ("", vec![("BEHEST_AGENT__TOKEN__REFRESH_MARGIN", "300")]),
    ] {
        let msg = load_with(toml, &env).unwrap_err().to_string();
        assert!(
            msg.contains("300 is a number without a unit") && msg.contains("\"300s\""),
            "{msg}"
        );
        assert!(!msg.contains("string"), "{msg}");
    }
    let s = load_with("[token]\nrefresh_margin = \"300s\"\n", &[]).unwrap();
    assert_eq!(s.token.refresh_margin, Duration::from_secs(300));
}

#[test]
fn counts_are_whole_numbers_never_rounded() {
    for (value, says) in [
        ("1.5", "1.5 is not a whole number"),
        ("-1", "-1 is negative"),
        ("\"100k\"", "\"100k\" is not a whole number"),
    ] {
        let toml = format!("[budget]\nsession_tokens = {value}\n");
        let msg = load_with(&toml, &[]).unwrap_err().to_string();
        assert!(
            msg.contains(says) && msg.contains("session_tokens") && msg.contains("config.toml"),
            "{value}: {msg}"
        );
    }
    let msg = load_with("[proxy]\nmax_connections = 2.5\n", &[])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("2.5 is not a whole number"), "{msg}");
    let s = load_with(
        "[budget]\nsession_tokens = 200000\n",
        &[("BEHEST_AGENT__BUDGET__SESSION_REQUESTS", "7")],
    )
    .unwrap();
    assert_eq!(s.budget.session_tokens, Some(200000));
    assert_eq!(s.budget.session_requests, Some(7));
    let msg = load_with("", &[("BEHEST_AGENT__BUDGET__HOURLY_TOKENS", "1e3")])
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("BEHEST_AGENT__BUDGET__HOURLY_TOKENS") && msg.contains("whole number"),
        "{msg}"
    );
    // Negative: no advice that does not hold for every count (0 is refused for some).
    let msg = load_with("[proxy]\nmax_connections = -1\n", &[])
        .unwrap_err()
        .to_string();
    assert!(!msg.contains("no limit"), "{msg}");
}

#[test]
fn an_empty_variable_that_hides_the_files_value_is_named() {
    let msg = load_with("", &[("BEHEST_AGENT__AUTH__CLIENT_ID", "")])
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("environment variable BEHEST_AGENT__AUTH__CLIENT_ID")
            && msg.contains("is empty")
            && !msg.contains("config.toml"),
        "{msg}"
    );
}

#[test]
fn a_list_key_of_the_wrong_type_says_what_it_takes() {
    let msg = load_with("[proxy]\nlisten = 5\n", &[])
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("proxy.listen") && msg.contains("a string or a list of strings"),
        "{msg}"
    );
    assert!(
        !msg.contains("OneOrMany") && !msg.contains("variant"),
        "{msg}"
    );
}

#[test]
fn an_error_in_an_environment_variable_names_the_variable_not_the_file() {
    let err = load_with("", &[("BEHEST_AGENT__PROXY__CONNECT_TIMEOUT", "soon")]).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("environment variable BEHEST_AGENT__PROXY__CONNECT_TIMEOUT")
            && !msg.contains("config.toml"),
        "{msg}"
    );
    let err = load_with("", &[("BEHEST_AGENT__PROXY__LISTEN", "10.0.0.1:80")]).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("environment variable BEHEST_AGENT__PROXY__LISTEN")
            && !msg.contains("config.toml"),
        "{msg}"
    );
    assert_eq!(
        err.fix(),
        "correct the environment variable BEHEST_AGENT__PROXY__LISTEN"
    );
    // The same value in the file names the file.
    let msg = load_with("[proxy]\nconnect_timeout = \"soon\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("config.toml"), "{msg}");
}

/// The `config` crate reads variable names in any case: an error in one named in lower case names
/// that variable too, not the file.
#[test]
fn an_error_in_a_lower_case_variable_names_it() {
    let var = "BEHEST_AGENT__proxy__idle_timeout";
    let err = load_with("", &[(var, "0s")]).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("environment variable {var}")) && !msg.contains("config.toml"),
        "{msg}"
    );
    assert_eq!(err.fix(), format!("correct the environment variable {var}"));
}

/// A profile name may hold `-` (`team-b`), and `--set` reaches its keys.
#[test]
fn set_reaches_a_profile_whose_name_has_a_dash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, MINIMAL).unwrap();
    let load = |value: &str| {
        config::load(&LoadOptions {
            path: Some(path.clone()),
            default_path: None,
            env: env(&[("AUTH0_CLIENT_SECRET", "s3cret-value")]),
            overrides: vec![
                ("profiles.team-b.client_id".into(), "team-b-client".into()),
                ("profiles.team-b.timeout".into(), value.into()),
            ],
        })
    };
    let s = load("7s").unwrap();
    let p = &s.profiles["team-b"];
    assert_eq!(p.auth.client_id, "team-b-client");
    assert_eq!(p.auth.timeout, Duration::from_secs(7));
    let err = load("0s").unwrap_err();
    assert!(
        err.to_string().contains("--set profiles.team-b.timeout"),
        "{err}"
    );
    assert_eq!(err.fix(), "correct the --set profiles.team-b.timeout");
}

/// `[auth]` keys the provider or client authentication in force does not use are said, not
/// silently dropped.
#[test]
fn unused_auth_keys_are_warned_about() {
    let s = load_with(
        "",
        &[
            ("BEHEST_AGENT__AUTH__ISSUER", "https://other.example/"),
            ("BEHEST_AGENT__AUTH__SIGNING_ALG", "RS256"),
            ("BEHEST_AGENT__PROFILES__P1__CLIENT_ID", "p1-client"),
            ("BEHEST_AGENT__PROFILES__P1__KEY_ID", "k1"),
        ],
    )
    .unwrap();
    // A profile's own keys, not what it inherits from [auth].
    assert!(
        !s.warnings
            .iter()
            .any(|w| w.starts_with("profiles.p1.issuer")),
        "{:?}",
        s.warnings
    );
    for key in ["auth.issuer", "auth.signing_alg", "profiles.p1.key_id"] {
        assert!(
            s.warnings
                .iter()
                .any(|w| w.starts_with(&format!("{key} is set but not used"))),
            "{key}: {:?}",
            s.warnings
        );
    }
    let s = load_with("", &[]).unwrap();
    assert!(
        !s.warnings.iter().any(|w| w.contains("is set but not used")),
        "{:?}",
        s.warnings
    );
}

/// Text that looks like a JSON list must be one of strings; an IPv6 address in brackets is not a
/// list.
#[test]
fn list_values_that_look_like_json_must_be_json_lists_of_strings() {
    for bad in ["[1]", "[tid, pid]", "['tid']", r#"["tid",1]"#] {
        let msg = load_with("", &[("BEHEST_AGENT__TOKEN__REQUIRED_CLAIMS", bad)])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("token.required_claims") && msg.contains("not a JSON list"),
            "{bad}: {msg}"
        );
    }
    let s = load_with(
        "",
        &[("BEHEST_AGENT__TOKEN__REQUIRED_CLAIMS", r#"["tid", "org"]"#)],
    )
    .unwrap();
    assert_eq!(s.token.required_claims, ["tid", "org"]);
    let s = load_with("", &[("BEHEST_AGENT__PROXY__LISTEN", "[::1]:8799")]).unwrap();
    assert_eq!(s.proxy.listen.len(), 1);
}

#[test]
fn zero_timeouts_are_refused_naming_the_key() {
    for key in [
        "auth.timeout",
        "proxy.connect_timeout",
        "proxy.header_read_timeout",
        "proxy.upstream_timeout",
        "proxy.idle_timeout",
    ] {
        let (section, name) = key.split_once('.').unwrap();
        let toml = if section == "auth" {
            // [auth] is in MINIMAL already: give it as a variable.
            String::new()
        } else {
            format!("[{section}]\n{name} = \"0s\"\n")
        };
        let var = format!("BEHEST_AGENT__{}", key.replace('.', "__").to_uppercase());
        let env = if section == "auth" {
            vec![(var.as_str(), "0s")]
        } else {
            vec![]
        };
        let err = load_with(&toml, &env).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("`{key}`")) && msg.contains("0 is not a usable timeout"),
            "{key}: {msg}"
        );
    }
    let s = load_with("[proxy]\nshutdown_grace = \"0s\"\n", &[]).unwrap();
    assert_eq!(s.proxy.shutdown_grace, Duration::ZERO, "0 = stop at once");
}

#[test]
fn an_empty_or_repeated_listen_address_is_refused() {
    for listen in ["\"\"", "[]", "[\"127.0.0.1:8711\", \"127.0.0.1:8711\"]"] {
        let err = load_with(&format!("[proxy]\nlisten = {listen}\n"), &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`proxy.listen`"), "{listen}: {msg}");
    }
}

#[test]
fn without_fleet_redis_url_the_fleet_is_off_and_its_other_keys_are_refused() {
    assert!(load_with("", &[]).unwrap().fleet.is_none());
    let msg = load_with("[fleet]\nlock_timeout = \"10s\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("fleet.redis_url") && msg.contains("fleet.lock_timeout"),
        "{msg}"
    );
    assert!(
        !load_with("", &[])
            .unwrap()
            .warnings
            .iter()
            .any(|w| w.contains("fleet"))
    );
    // Set but empty (an unset CI variable): off, and said so.
    for s in [
        load_with("[fleet]\nredis_url = \"\"\n", &[]).unwrap(),
        load_with("", &[("BEHEST_AGENT__FLEET__REDIS_URL", "")]).unwrap(),
    ] {
        assert!(s.fleet.is_none());
        assert!(
            s.warnings
                .iter()
                .any(|w| w.contains("fleet.redis_url is set but empty")),
            "{:?}",
            s.warnings
        );
    }
}

#[test]
fn fleet_keys_have_their_defaults_and_take_the_environment() {
    let s = load_with("[fleet]\nredis_url = \"redis://10.0.0.5:6379/2\"\n", &[]).unwrap();
    let f = s.fleet.expect("the fleet is on");
    assert_eq!(f.redis_url.as_str(), "redis://10.0.0.5:6379/2");
    assert_eq!(f.key_prefix, "behest-agent:");
    assert_eq!(f.lock_timeout, Duration::from_secs(30));
    assert_eq!(f.timeout, Duration::from_secs(2));
    assert_eq!(f.username, None);

    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("redis-password");
    std::fs::write(&pw, "pw-0123456789\n").unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let s = load_with(
        "",
        &[
            (
                "BEHEST_AGENT__FLEET__REDIS_URL",
                "rediss://redis.internal:6380",
            ),
            ("BEHEST_AGENT__FLEET__REDIS_USERNAME", "agent"),
            (
                "BEHEST_AGENT__FLEET__REDIS_PASSWORD_FILE",
                pw.to_str().unwrap(),
            ),
            ("BEHEST_AGENT__FLEET__KEY_PREFIX", "ci:"),
            ("BEHEST_AGENT__FLEET__LOCK_TIMEOUT", "45s"),
            ("BEHEST_AGENT__FLEET__TIMEOUT", "500ms"),
        ],
    )
    .unwrap();
    let f = s.fleet.unwrap();
    assert_eq!(f.username.as_deref(), Some("agent"));
    assert_eq!(f.password_file.as_deref(), Some(pw.as_path()));
    assert_eq!(f.key_prefix, "ci:");
    assert_eq!(f.lock_timeout, Duration::from_secs(45));
    assert_eq!(f.timeout, Duration::from_millis(500));
    assert!(
        !s.warnings.iter().any(|w| w.contains("fleet")),
        "a 0600 password file over TLS is nothing to warn about: {:?}",
        s.warnings
    );
}

#[test]
fn a_bad_fleet_setting_names_its_key_and_never_quotes_a_password() {
    for (toml, key, words) in [
        (
            "redis_url = \"http://10.0.0.5:6379\"",
            "fleet.redis_url",
            "redis://",
        ),
        (
            "redis_url = \"redis://:hunter2-pw@10.0.0.5:6379\"",
            "fleet.redis_url",
            "redis_password_file",
        ),
        (
            "redis_url = \"redis://agent@10.0.0.5:6379/0?password=hunter2\"",
            "fleet.redis_url",
            "redis_username",
        ),
        (
            "redis_url = \"redis://10.0.0.5:6379/0?password=hunter2\"",
            "fleet.redis_url",
            "redis_password_file",
        ),
        (
            "redis_url = \"redis://10.0.0.5:6379/0#hunter2\"",
            "fleet.redis_url",
            "query or fragment",
        ),
        (
            "redis_url = \"redis://:hunter2@10.0.0.5:port\"",
            "fleet.redis_url",
            "not a URL",
        ),
        (
            "redis_url = \"redis://10.0.0.5:6379/cache\"",
            "fleet.redis_url",
            "database number",
        ),
        (
            "redis_url = \"redis://10.0.0.5\"\nredis_password_file = \"/nonexistent/pw\"",
            "fleet.redis_password_file",
            "/nonexistent/pw",
        ),
        (
            "redis_url = \"redis://10.0.0.5\"\nca_file = \"/etc/hostname\"",
            "fleet.ca_file",
            "rediss://",
        ),
        (
            "redis_url = \"redis://10.0.0.5\"\ntimeout = \"0s\"",
            "fleet.timeout",
            "0",
        ),
        (
            "redis_url = \"redis://10.0.0.5\"\nlock_timeout = \"0s\"",
            "fleet.lock_timeout",
            "0",
        ),
        (
            "redis_url = \"redis://10.0.0.5\"\nkey_prefix = \"a b\"",
            "fleet.key_prefix",
            "spaces",
        ),
    ] {
        let msg = load_with(&format!("[fleet]\n{toml}\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(msg.contains(key) && msg.contains(words), "{toml}: {msg}");
        assert!(!msg.contains("hunter2"), "the password is quoted: {msg}");
    }
}

#[test]
fn a_redis_password_over_plain_redis_to_another_host_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("redis-password");
    std::fs::write(&pw, "pw-0123456789\n").unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let s = load_with(
        &format!(
            "[fleet]\nredis_url = \"redis://10.0.0.5:6379\"\nredis_password_file = \"{}\"\n",
            pw.display()
        ),
        &[],
    )
    .unwrap();
    let all = s.warnings.join("\n");
    assert!(all.contains("rediss://"), "{all}");
    assert!(
        all.contains("fleet.redis_password_file") && all.contains("chmod 600"),
        "{all}"
    );
    assert!(!all.contains("pw-0123456789"));
    // To this machine's loopback, by name or address, there is no network to cross.
    for host in ["localhost", "127.0.0.1", "127.0.0.2", "[::1]"] {
        let s = load_with(
            &format!(
                "[fleet]\nredis_url = \"redis://{host}:6379\"\nredis_password_file = \"{}\"\n",
                pw.display()
            ),
            &[],
        )
        .unwrap();
        assert!(
            !s.warnings.iter().any(|w| w.contains("rediss://")),
            "{host}: {:?}",
            s.warnings
        );
    }
}

#[test]
fn a_log_level_that_is_no_level_is_refused_rather_than_silencing_the_log() {
    for bad in ["warnn", "x=nolevel", "behest_agent=loud,info", "=debug"] {
        let msg = load_with(&format!("[telemetry]\nlog_level = \"{bad}\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("telemetry.log_level") && msg.contains("is not a level or filter"),
            "{bad}: {msg}"
        );
    }
    for good in [
        "Warn",
        "info",
        "warn,behest_agent=debug",
        "behest_agent=TRACE",
        "off",
    ] {
        load_with(&format!("[telemetry]\nlog_level = \"{good}\"\n"), &[])
            .unwrap_or_else(|e| panic!("{good}: {e}"));
    }
}

#[test]
fn a_session_id_that_cannot_be_sent_and_zero_connections_are_refused_at_load() {
    for (toml, key) in [
        ("[proxy]\nsession_id = \"a b\"\n", "proxy.session_id"),
        ("[proxy]\nmax_connections = 0\n", "proxy.max_connections"),
        (
            "[proxy]\nmax_upstream_connections = 0\n",
            "proxy.max_upstream_connections",
        ),
    ] {
        let msg = load_with(toml, &[]).expect_err(key).to_string();
        assert!(msg.contains(key), "{msg}");
    }
    let long = format!("[proxy]\nsession_id = \"{}\"\n", "x".repeat(129));
    let msg = load_with(&long, &[]).unwrap_err().to_string();
    assert!(msg.contains("proxy.session_id"), "{msg}");
}

/// Every list key takes a comma-separated string from `--set` and the environment, its items
/// trimmed as in the file (`"a, b"` made ` b`: a listen address refused, an origin never matched).
#[test]
fn list_keys_take_comma_separated_strings_from_set_and_the_environment() {
    let load = |pairs: &[(&str, &str)], overrides: &[(&str, &str)]| {
        let mut pairs = pairs.to_vec();
        pairs.push(("AUTH0_CLIENT_SECRET", "s3cret-value"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        config::load(&LoadOptions {
            path: Some(path),
            default_path: None,
            env: env(&pairs),
            overrides: overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
        .unwrap()
    };
    let check = |s: &config::Settings| {
        assert_eq!(
            s.proxy.allowed_origins,
            ["http://a.example", "http://b.example"]
        );
        assert_eq!(s.proxy.allowed_hosts, ["agent", "agent.local"]);
        assert_eq!(s.token.required_claims, ["tid", "pid"]);
        assert_eq!(s.proxy.listen.len(), 2);
    };
    check(&load(
        &[
            (
                "BEHEST_AGENT__PROXY__ALLOWED_ORIGINS",
                "http://a.example, http://b.example",
            ),
            ("BEHEST_AGENT__PROXY__ALLOWED_HOSTS", "agent, agent.local"),
            ("BEHEST_AGENT__TOKEN__REQUIRED_CLAIMS", "tid, pid"),
            ("BEHEST_AGENT__PROXY__LISTEN", "127.0.0.1:1, 127.0.0.1:2"),
        ],
        &[],
    ));
    check(&load(
        &[],
        &[
            ("proxy.allowed_origins", "http://a.example,http://b.example"),
            ("proxy.allowed_hosts", "agent, agent.local"),
            ("token.required_claims", "tid,pid"),
            ("proxy.listen", "127.0.0.1:1,127.0.0.1:2"),
        ],
    ));
    // An empty string is an empty list: no claim required.
    let s = load(&[], &[("token.required_claims", "")]);
    assert!(s.token.required_claims.is_empty());
    // A list written as one (it was split at its comma into `["tid"` and `"pid"]`), from
    // `--set` and from the environment; IPv6 addresses are not taken for one.
    let s = load(&[], &[("token.required_claims", r#"["tid", "pid"]"#)]);
    assert_eq!(s.token.required_claims, ["tid", "pid"]);
    let s = load(
        &[
            ("BEHEST_AGENT__TOKEN__REQUIRED_CLAIMS", r#"["tid","pid"]"#),
            (
                "BEHEST_AGENT__PROXY__LISTEN",
                r#"["127.0.0.1:1", "127.0.0.1:2"]"#,
            ),
        ],
        &[],
    );
    assert_eq!(s.token.required_claims, ["tid", "pid"]);
    assert_eq!(s.proxy.listen.len(), 2);
    let s = load(&[], &[("proxy.listen", "[::1]:1,[::1]:2")]);
    assert_eq!(s.proxy.listen.len(), 2);
}

#[test]
fn a_bad_backoff_names_the_key_that_was_set() {
    for (toml, key) in [
        ("[token]\nmin_backoff = \"0s\"\n", "token.min_backoff"),
        ("[token]\nmin_backoff = \"10m\"\n", "token.min_backoff"),
        (
            "[token]\nmin_backoff = \"5s\"\nmax_backoff = \"2s\"\n",
            "token.max_backoff",
        ),
    ] {
        let msg = load_with(toml, &[]).expect_err(toml).to_string();
        assert!(msg.contains(key), "{toml}: {msg}");
    }
}

#[test]
fn a_fleet_lock_shorter_than_a_grant_may_take_is_warned_about() {
    let s = load_with(
        "[fleet]\nredis_url = \"redis://127.0.0.1:6379\"\nlock_timeout = \"1s\"\n",
        &[],
    )
    .unwrap();
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("fleet.lock_timeout") && w.contains("auth.timeout")),
        "{:?}",
        s.warnings
    );
}

/// `status` shows the daemon's config file to a CLI run elsewhere: the path is absolute.
#[test]
fn a_relative_config_path_is_kept_absolute() {
    // cargo runs the tests in the package's directory.
    let s = config::load(&LoadOptions {
        path: Some("config/behest-agent.toml".into()),
        default_path: None,
        env: env(&[("AUTH0_CLIENT_SECRET", "s3cret-value")]),
        overrides: vec![],
    })
    .expect("config/behest-agent.toml loads");
    let path = s.path.unwrap();
    assert!(path.is_absolute() && path.exists(), "{}", path.display());
}

/// A bad value from the well-known fallbacks (`AUTH0_DOMAIN`, `BEHEST_BASE_URL`) names the
/// variable, not a file that does not hold it.
#[test]
fn an_error_in_a_fallback_variable_names_the_variable() {
    let no_domain = "[auth]\nclient_id = \"abc\"\naudience = \"https://api.behest.app\"\n";
    let (_d, r) = load_file(
        no_domain,
        &[
            ("AUTH0_DOMAIN", "https://bob:hunter2@idp.example"),
            ("AUTH0_CLIENT_SECRET", "s3cret-value"),
        ],
    );
    let e = r.unwrap_err();
    let msg = format!("{} / {}", e.problem(), e.fix());
    assert!(msg.contains("environment variable AUTH0_DOMAIN"), "{msg}");
    assert!(
        !msg.contains("config.toml") && !msg.contains("hunter2"),
        "{msg}"
    );
    let (_d, r) = load_file(
        MINIMAL,
        &[
            ("BEHEST_BASE_URL", "http://gateway.example.com"),
            ("AUTH0_CLIENT_SECRET", "s3cret-value"),
        ],
    );
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains("environment variable BEHEST_BASE_URL"),
        "{msg}"
    );
}
