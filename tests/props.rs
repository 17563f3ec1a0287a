//! Property tests (proptest) for the parsers that take hostile input: the config loader (TOML text,
//! `BEHEST_AGENT__…` environment maps, `--set` overrides), the token checks (`Verifier::check`, with
//! signature verification off and on), the `/s/SESSION/` + path rewriting and the header rewriting
//! (both driven over TCP through a running proxy, since their functions are private), and the
//! small parsers of IdP and cache input (`wait_hint`, `DiskCache::load`).
//!
//! Properties: no panic on any input; no error or `Debug` output carries the client secret; a token
//! the issuer did not sign is never accepted when verification is on; a request never reaches a
//! host other than the configured upstream, never leaves its base path, never carries the client's
//! `Authorization`/`Proxy-Authorization`, and always carries exactly one `Authorization: Bearer`
//! with the agent's token.
//!
//! Case counts stay modest (see [`CASES`]) so the whole module runs in seconds on two cores; a
//! deeper run is `PROPTEST_CASES=5000 cargo test --test tests -- props::`.

use std::collections::HashMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use behest_agent::auth::ResolvedEndpoints;
use behest_agent::clock;
use behest_agent::config::{self, LoadOptions, TokenSettings, UidCheck};
use behest_agent::token::cache::{DiskCache, Identity};
use behest_agent::token::{TokenSource, Verifier};
use devkit::idp::Fault;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use url::Url;

use crate::rig::{Rig, path_of, query_of, under_base};
use crate::util::{AUDIENCE, Harness};

/// Cases per property, unless `PROPTEST_CASES` says otherwise.
const CASES: u32 = 256;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES)
}

/// Runs `test` on `cases()` values of `strategy`; proptest catches panics, shrinks, and reports the
/// smallest failing input.
fn check<S>(strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: Debug,
{
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

// =============================================================================================
// The config loader

/// The file model's sections and keys (config/file.rs).
const FIELDS: &[(&str, &[&str])] = &[
    (
        "auth",
        &[
            "provider",
            "domain",
            "issuer",
            "token_url",
            "jwks_url",
            "client_id",
            "client_secret_file",
            "client_auth",
            "private_key_file",
            "signing_alg",
            "key_id",
            "audience",
            "resource",
            "scope",
            "organization",
            "extra_params",
            "timeout",
        ],
    ),
    (
        "token",
        &[
            "uid_claim",
            "expected_uid",
            "uid_check",
            "required_claims",
            "verify_signature",
            "refresh_margin",
            "min_backoff",
            "max_backoff",
            "cache_file",
        ],
    ),
    (
        "proxy",
        &[
            "listen",
            "upstream",
            "allow_insecure_upstream",
            "ca_file",
            "session_id",
            "session_from_ci",
            "allow_remote",
            "allowed_origins",
            "require_key",
            "allowed_hosts",
            "max_connections",
            "max_replay_body",
            "connect_timeout",
            "header_read_timeout",
            "upstream_timeout",
            "idle_timeout",
            "shutdown_grace",
        ],
    ),
    ("control", &["socket", "socket_mode"]),
    ("telemetry", &["log_format", "log_level", "metrics_listen"]),
];

/// Keys whose value the loader opens as a file: only ever given the files of [`Files`], so a
/// generated `/dev/zero` or FIFO can never make a case hang.
const FILE_KEYS: &[&str] = &["client_secret_file", "private_key_file", "ca_file"];

/// Values that reach the interesting branches of validation.
const WORDS: &[&str] = &[
    "",
    " ",
    "auth0",
    "oidc",
    "example.eu.auth0.com",
    "https://idp.example",
    "https://idp.example/",
    "http://127.0.0.1:1",
    "http://localhost:8080/base/",
    "http://evil.example",
    "ftp://x",
    "https://u:p@api.example/?q#f",
    "not a url",
    "https://api.behest.test",
    "client_secret_post",
    "client_secret_basic",
    "private_key_jwt",
    "RS256",
    "ES256",
    "HS256",
    "none",
    "enforce",
    "warn",
    "auto",
    "text",
    "json",
    "info",
    "debug",
    "behest_agent=trace",
    "[{",
    "127.0.0.1:0",
    "127.0.0.1:8711",
    "0.0.0.0:80",
    "[::1]:0",
    "localhost:99999",
    "localhost:",
    "unix:",
    "unix:/tmp/behest-props.sock",
    "127.0.0.1:1,unix:/tmp/x.sock, ,",
    "1MiB",
    "0",
    "18446744073709551615",
    "18446744073709551615GiB",
    "99999999999999999999",
    "1 TB",
    "0o660",
    "0o7777",
    "0660",
    "999",
    "1s",
    "0s",
    "1ns",
    "300ms",
    "18446744073709551615s",
    "99999999999999999999999h",
    "-1s",
    "1y",
    "forever",
    "true",
    "false",
    "tid,pid",
    "a,,b",
];

/// The files a file key may name.
struct Files {
    _dir: tempfile::TempDir,
    paths: Vec<String>,
}

const SECRET_PREFIX: &str = "zz-secret-";

fn files() -> &'static Files {
    static FILES: OnceLock<Files> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        // The secret file's content carries the prefix the leak checks look for.
        std::fs::write(p("secret"), format!("{SECRET_PREFIX}fromfile0123456789\n")).unwrap();
        std::fs::write(p("empty"), "").unwrap();
        std::fs::write(
            p("key.pem"),
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        std::fs::create_dir(p("dir")).unwrap();
        std::fs::create_dir(p("creds")).unwrap();
        std::fs::write(
            p("creds/client-secret"),
            format!("{SECRET_PREFIX}credential\n"),
        )
        .unwrap();
        let paths = ["secret", "empty", "key.pem", "dir", "missing"]
            .iter()
            .map(|n| p(n).display().to_string())
            .chain(["".to_string()])
            .collect();
        Files { _dir: dir, paths }
    })
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04X}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(WORDS).prop_map(String::from),
        1 => "\\PC{0,24}",
    ]
}

fn file_path() -> impl Strategy<Value = String> {
    prop::sample::select(files().paths.clone())
}

/// A TOML value: strings, numbers, booleans, dates, arrays and inline tables.
fn toml_value() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        6 => word().prop_map(|w| toml_str(&w)),
        2 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|f| format!("{f:?}")),
        1 => any::<bool>().prop_map(|b| b.to_string()),
        1 => Just("1979-05-27T07:32:00Z".to_string()),
        1 => Just("'literal \\ string'".to_string()),
    ];
    scalar.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec(("[a-z_]{1,8}", inner), 0..3).prop_map(|v| {
                let fields: Vec<String> =
                    v.into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", fields.join(", "))
            }),
        ]
    })
}

/// `key = value` for a key of `section` (or a made-up one); file keys get a file of [`Files`].
fn toml_assignment(section: usize) -> impl Strategy<Value = String> {
    let keys = FIELDS[section].1;
    prop_oneof![
        5 => prop::sample::select(keys).prop_flat_map(|k| {
            let value = if FILE_KEYS.contains(&k) {
                file_path().prop_map(|p| toml_str(&p)).boxed()
            } else {
                toml_value().boxed()
            };
            (Just(k), value).prop_map(|(k, v)| format!("{k} = {v}"))
        }),
        1 => ("[a-z_]{1,10}", toml_value()).prop_map(|(k, v)| format!("{k} = {v}")),
    ]
}

/// A TOML document made of the file model's sections, with garbage lines now and then.
fn toml_document() -> impl Strategy<Value = String> {
    let section = (0..FIELDS.len()).prop_flat_map(|i| {
        let header = prop_oneof![
            8 => Just(format!("[{}]", FIELDS[i].0)),
            1 => Just(format!("[[{}]]", FIELDS[i].0)),
            1 => Just("[auth.extra_params]".to_string()),
            1 => "[a-z_.]{1,12}".prop_map(|s| format!("[{s}]")),
        ];
        (header, prop::collection::vec(toml_assignment(i), 0..6))
            .prop_map(|(h, lines)| format!("{h}\n{}", lines.join("\n")))
    });
    let part = prop_oneof![
        10 => section,
        1 => "\\PC{0,40}",
        1 => ("[a-z_]{1,8}\\.[a-z_]{1,8}", toml_value()).prop_map(|(k, v)| format!("{k} = {v}")),
    ];
    prop::collection::vec(part, 0..6).prop_map(|v| v.join("\n"))
}

fn upper(s: &str) -> String {
    s.to_ascii_uppercase()
}

/// One `BEHEST_AGENT__…` variable (or one of the plain ones the loader reads).
fn env_pair() -> impl Strategy<Value = (String, String)> {
    let known = (0..FIELDS.len()).prop_flat_map(|i| {
        prop::sample::select(FIELDS[i].1).prop_flat_map(move |k| {
            let name = format!("BEHEST_AGENT__{}__{}", upper(FIELDS[i].0), upper(k));
            let value = if FILE_KEYS.contains(&k) {
                file_path().boxed()
            } else {
                word().boxed()
            };
            (Just(name), value)
        })
    });
    let plain = prop::sample::select(
        &[
            "AUTH0_DOMAIN",
            "AUTH0_CLIENT_ID",
            "AUTH0_AUDIENCE",
            "BEHEST_BASE_URL",
            "BEHEST_AGENT_CONFIG",
            "HOME",
            "XDG_STATE_HOME",
            "STATE_DIRECTORY",
            "RUNTIME_DIRECTORY",
            "XDG_RUNTIME_DIR",
        ][..],
    )
    .prop_flat_map(|k| (Just(k.to_string()), word()));
    prop_oneof![
        12 => known,
        2 => plain,
        1 => ("[A-Z0-9_]{0,24}", word()).prop_map(|(k, v)| (format!("BEHEST_AGENT__{k}"), v)),
        1 => ("[A-Z_]{1,10}", word())
            .prop_map(|(k, v)| (format!("BEHEST_AGENT__AUTH__EXTRA_PARAMS__{k}"), v)),
        1 => prop::sample::select(vec![
            files().paths[3].clone(),
            Path::new(&files().paths[3]).parent().unwrap().join("creds").display().to_string(),
            "/nonexistent".to_string(),
        ])
        .prop_map(|d| ("CREDENTIALS_DIRECTORY".to_string(), d)),
    ]
}

/// A `--set section.key=value` override; indexes stay small (see
/// `config_keys_with_huge_array_indexes_are_refused_not_allocated`).
fn override_pair() -> impl Strategy<Value = (String, String)> {
    let known = (0..FIELDS.len()).prop_flat_map(|i| {
        prop::sample::select(FIELDS[i].1).prop_flat_map(move |k| {
            let value = if FILE_KEYS.contains(&k) {
                file_path().boxed()
            } else {
                word().boxed()
            };
            (Just(format!("{}.{k}", FIELDS[i].0)), value)
        })
    });
    prop_oneof![
        8 => known,
        1 => ("[a-z_]{0,8}(\\.[a-z_]{0,8}){0,2}(\\[-?[0-9]{1,2}\\])?", word()),
    ]
}

/// Where the client secret is given, and its value.
#[derive(Debug, Clone)]
struct SecretVar {
    var: &'static str,
    value: String,
}

fn secret_var() -> impl Strategy<Value = SecretVar> {
    (
        prop_oneof![
            4 => Just("BEHEST_AGENT_CLIENT_SECRET"),
            4 => Just("AUTH0_CLIENT_SECRET"),
            // Not a key the loader knows, but where someone would put it by mistake.
            1 => Just("BEHEST_AGENT__AUTH__CLIENT_SECRET"),
        ],
        "[A-Za-z0-9._~+/=-]{8,40}",
    )
        .prop_map(|(var, tail)| SecretVar {
            var,
            value: format!("{SECRET_PREFIX}{tail}"),
        })
}

/// A valid Auth0 set-up through the environment, so that most cases get past the required keys
/// and into the validation of the others.
fn baseline_env(with: bool) -> HashMap<String, String> {
    if !with {
        return HashMap::new();
    }
    [
        ("BEHEST_AGENT__AUTH__DOMAIN", "example.eu.auth0.com"),
        ("BEHEST_AGENT__AUTH__CLIENT_ID", "abc123"),
        ("BEHEST_AGENT__AUTH__AUDIENCE", AUDIENCE),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Cases whose configuration loaded: proof the generators reach past the required keys.
static LOADED: AtomicUsize = AtomicUsize::new(0);

/// Loads with `toml` (if any) as the config file; checks nothing about the secret leaks.
fn load_and_check_no_leak(
    toml: Option<&str>,
    env: HashMap<String, String>,
    overrides: Vec<(String, String)>,
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = toml.map(|t| {
        let p = dir.path().join("config.toml");
        std::fs::write(&p, t).unwrap();
        p
    });
    let result = config::load(&LoadOptions {
        path,
        default_path: None,
        env,
        overrides,
    });
    if result.is_ok() {
        LOADED.fetch_add(1, Ordering::Relaxed);
    }
    let shown = match &result {
        Ok(s) => format!("{s:?} {:?}", s.warnings),
        Err(e) => format!("{e} {e:?}"),
    };
    prop_assert!(
        !shown.contains(SECRET_PREFIX),
        "the loader showed a client secret: {shown}"
    );
    Ok(())
}

#[test]
fn config_loader_never_panics_on_arbitrary_toml_text() {
    let text = prop_oneof![
        1 => any::<String>(),
        1 => "[\\[\\]=\"'a-z_.0-9 \n#{},]{0,200}",
        4 => toml_document(),
    ];
    check(
        (text, secret_var(), any::<bool>()),
        |(text, secret, baseline)| {
            let mut env = baseline_env(baseline);
            env.insert(secret.var.to_string(), secret.value);
            load_and_check_no_leak(Some(&text), env, vec![])
        },
    );
}

#[test]
fn config_loader_never_panics_on_arbitrary_environment_and_overrides() {
    let input = (
        prop::option::weighted(0.3, toml_document()),
        prop::bool::weighted(0.8),
        prop::collection::vec(env_pair(), 0..8),
        prop::collection::vec(override_pair(), 0..3),
        prop::collection::vec(secret_var(), 0..3),
        prop::bool::weighted(0.1),
    );
    check(
        input,
        |(toml, baseline, pairs, overrides, secrets, mistaken_set)| {
            let mut env = baseline_env(baseline);
            env.extend(pairs);
            let mut overrides = overrides;
            for s in secrets {
                if mistaken_set {
                    overrides.push(("auth.client_secret".to_string(), s.value.clone()));
                }
                env.insert(s.var.to_string(), s.value);
            }
            load_and_check_no_leak(toml.as_deref(), env, overrides)
        },
    );
    assert!(
        LOADED.load(Ordering::Relaxed) > 0,
        "no generated configuration was valid: the property only saw early errors"
    );
}

#[test]
fn config_keys_with_huge_array_indexes_are_refused_not_allocated() {
    // The `config` crate reads `key[N]` in any key (environment, `--set`, a quoted TOML key) as
    // "element N of an array" and grows the array to N+1 elements first: with N = 2^62 that is a
    // capacity-overflow panic; with N = 10^10 it is an allocation of hundreds of GiB (an abort).
    // The loader must refuse such keys before the crate sees them.
    let huge = "4611686018427387903";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(
        &file,
        format!("\"proxy.listen[{huge}]\" = \"127.0.0.1:1\"\n"),
    )
    .unwrap();
    let cases: Vec<(&str, LoadOptions)> = vec![
        (
            "environment",
            LoadOptions {
                env: HashMap::from([(
                    format!("BEHEST_AGENT__PROXY__LISTEN[{huge}]"),
                    "127.0.0.1:1".to_string(),
                )]),
                ..LoadOptions::default()
            },
        ),
        (
            "--set",
            LoadOptions {
                overrides: vec![(format!("proxy.listen[{huge}]"), "127.0.0.1:1".to_string())],
                ..LoadOptions::default()
            },
        ),
        (
            "file",
            LoadOptions {
                path: Some(file.clone()),
                ..LoadOptions::default()
            },
        ),
    ];
    let mut panicked = Vec::new();
    for (what, opts) in cases {
        let r = std::panic::catch_unwind(|| config::load(&opts).map(|_| ()));
        match r {
            Err(_) => panicked.push(what),
            Ok(Ok(())) => panic!("{what}: a key with an index was accepted"),
            Ok(Err(_)) => {}
        }
    }
    assert!(
        panicked.is_empty(),
        "config::load panicked on an array index key from: {panicked:?}"
    );
}

// =============================================================================================
// Token checks

/// A reqwest client for verifiers (building one reads the system's roots: once).
fn http_client() -> reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            behest_agent::auth::http::client(Duration::from_secs(5), None, &Default::default())
                .unwrap()
        })
        .clone()
}

fn token_settings(verify: bool, uid_check: UidCheck, expected_uid: &str) -> TokenSettings {
    TokenSettings {
        client_id: expected_uid.to_string(),
        uid_claim: "uid".to_string(),
        expected_uid: expected_uid.to_string(),
        uid_check,
        required_claims: vec!["tid".to_string(), "pid".to_string()],
        verify_signature: verify,
        refresh_margin: Duration::from_secs(300),
        min_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(8),
        cache_file: None,
    }
}

const ISSUER: &str = "https://idp.example/";

fn endpoints(issuer: Option<&str>, jwks: Option<&str>) -> ResolvedEndpoints {
    ResolvedEndpoints {
        issuer: issuer.map(String::from),
        token_url: Url::parse("https://idp.example/oauth/token").unwrap(),
        jwks_url: jwks.map(|u| Url::parse(u).unwrap()),
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A JSON value, recursively.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::from)),
        "\\PC{0,16}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `exp` as an IdP (or an attacker) might write it: any integer, huge, negative, fractional,
/// a string, far past or far future.
fn exp_claim() -> impl Strategy<Value = Value> {
    let now = clock::system().unix();
    prop_oneof![
        4 => (now + 60..now + 86_400 * 365).prop_map(Value::from),
        2 => any::<u64>().prop_map(Value::from),
        1 => prop::sample::select(vec![
            0u64,
            1,
            253_402_300_799,
            253_402_300_800,
            i64::MAX as u64,
            i64::MAX as u64 + 1,
            u64::MAX,
        ])
        .prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::from)),
        1 => "\\PC{0,12}".prop_map(Value::from),
        1 => Just(Value::Null),
    ]
}

fn claims_object() -> impl Strategy<Value = Value> {
    let s = || prop_oneof![Just(Value::from("client-1")), json_value()];
    (
        prop::option::of(exp_claim()),
        prop::option::weighted(0.7, prop_oneof![Just(Value::from(ISSUER)), json_value()]),
        prop::option::weighted(
            0.7,
            prop_oneof![
                Just(Value::from(AUDIENCE)),
                Just(json!([AUDIENCE, "other"])),
                json_value()
            ],
        ),
        prop::option::weighted(0.7, s()),
        prop::option::of(s()),
        prop::option::of(s()),
        prop::collection::btree_map("[a-z_]{1,6}", json_value(), 0..3),
    )
        .prop_map(|(exp, iss, aud, uid, tid, pid, extra)| {
            let mut m: serde_json::Map<String, Value> = extra.into_iter().collect();
            for (k, v) in [
                ("exp", exp),
                ("iss", iss),
                ("aud", aud),
                ("uid", uid),
                ("tid", tid),
                ("pid", pid),
            ] {
                if let Some(v) = v {
                    m.insert(k.to_string(), v);
                }
            }
            Value::Object(m)
        })
}

fn header_object(kids: Vec<String>) -> impl Strategy<Value = Value> {
    let alg = prop_oneof![
        prop::sample::select(vec![
            "RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA", "HS256", "HS512",
            "none", "None", "", "rs256",
        ])
        .prop_map(Value::from),
        json_value(),
    ];
    let kid = prop_oneof![
        prop::sample::select(kids).prop_map(Value::from),
        json_value()
    ];
    (alg, prop::option::of(kid), prop::option::of(Just("JWT"))).prop_map(|(alg, kid, typ)| {
        let mut m = serde_json::Map::new();
        m.insert("alg".into(), alg);
        if let Some(k) = kid {
            m.insert("kid".into(), k);
        }
        if let Some(t) = typ {
            m.insert("typ".into(), t.into());
        }
        Value::Object(m)
    })
}

/// Token strings: raw text, JWT-shaped junk, and well-formed JWTs with hostile claims and a
/// signature of random bytes.
fn token_text(kids: Vec<String>) -> impl Strategy<Value = String> {
    let structured = (
        prop_oneof![4 => header_object(kids), 1 => json_value()],
        prop_oneof![6 => claims_object(), 1 => json_value()],
        prop::collection::vec(any::<u8>(), 0..300),
        prop::sample::select(vec!["", "=", "==", "."]),
    )
        .prop_map(|(h, p, sig, pad)| {
            format!(
                "{}.{}{pad}.{}",
                b64(h.to_string().as_bytes()),
                b64(p.to_string().as_bytes()),
                b64(&sig)
            )
        });
    prop_oneof![
        1 => any::<String>(),
        1 => "[A-Za-z0-9_=.+/-]{0,120}",
        1 => "[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,40}",
        6 => structured,
    ]
}

#[test]
fn claims_checker_never_panics_on_arbitrary_tokens_without_signature_checks() {
    let rt = runtime();
    let now = clock::system().unix();
    let input = (
        token_text(vec!["k1".to_string()]),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    );
    check(input, |(token, warn, with_issuer, with_audience)| {
        let uid_check = if warn {
            UidCheck::Warn
        } else {
            UidCheck::Enforce
        };
        let verifier = Verifier::new(
            token_settings(false, uid_check, "client-1"),
            with_audience.then(|| AUDIENCE.to_string()),
            http_client(),
            clock::system(),
        );
        let ep = endpoints(with_issuer.then_some(ISSUER), None);
        let secret = SecretString::from(token.clone());
        let result = rt.block_on(verifier.check(&secret, &ep));
        if let Ok((claims, _warnings)) = result {
            // Whatever was accepted is a JWT that has not expired and meets the configuration.
            prop_assert!(claims.exp > now, "{token}");
            if with_audience {
                prop_assert!(claims.audiences().iter().any(|a| a == AUDIENCE));
            }
            if !warn {
                prop_assert_eq!(claims.uid.as_deref(), Some("client-1"));
            }
        }
        Ok(())
    });
}

/// A Verifier for the embedded IdP, with signature checks, and a genuine token from it.
struct Issuer {
    h: Harness,
    verifier: Verifier,
    endpoints: ResolvedEndpoints,
    genuine: String,
}

async fn issuer() -> Issuer {
    let h = Harness::start().await;
    let verifier = Verifier::new(
        token_settings(true, UidCheck::Enforce, &h.client_id),
        Some(AUDIENCE.to_string()),
        http_client(),
        clock::system(),
    );
    let endpoints = ResolvedEndpoints {
        issuer: Some(h.idp.issuer()),
        token_url: Url::parse(&h.idp.token_endpoint()).unwrap(),
        jwks_url: Some(Url::parse(&h.idp.jwks_uri()).unwrap()),
    };
    let genuine = h.idp.mint(json!({ "uid": h.client_id }));
    h.remember(&genuine);
    let ok = verifier
        .check(&SecretString::from(genuine.clone()), &endpoints)
        .await;
    assert!(ok.is_ok(), "the genuine token verifies: {:?}", ok.err());
    Issuer {
        h,
        verifier,
        endpoints,
        genuine,
    }
}

/// The three parts of a JWT, decoded the strict way the checks decode them.
fn parts(token: &str) -> Option<Vec<Vec<u8>>> {
    let p: Vec<&str> = token.split('.').collect();
    if p.len() != 3 {
        return None;
    }
    p.iter().map(|s| URL_SAFE_NO_PAD.decode(s).ok()).collect()
}

#[test]
fn with_signature_checks_no_token_the_issuer_did_not_sign_is_accepted() {
    let rt = runtime();
    let iss = rt.block_on(issuer());
    let genuine = iss.genuine.clone();
    let genuine_parts = parts(&genuine).unwrap();
    let kid = iss.h.idp.current_kid();
    let n = genuine.len();
    let forged = prop_oneof![
        // Anything at all, and JWTs with hostile claims and a random signature, naming the
        // issuer's real key id or another.
        3 => token_text(vec![kid.clone(), "rogue".to_string()]),
        // The genuine token with one character changed.
        3 => (0..n, prop::sample::select(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ "
                .chars()
                .collect::<Vec<_>>(),
        ))
        .prop_map({
            let g = genuine.clone();
            move |(i, c)| {
                let mut chars: Vec<char> = g.chars().collect();
                chars[i] = c;
                chars.into_iter().collect::<String>()
            }
        }),
        // The genuine header and signature around other claims (raised uid, later exp, …).
        2 => claims_object().prop_map({
            let g = genuine.clone();
            move |claims| {
                let p: Vec<&str> = g.split('.').collect();
                format!("{}.{}.{}", p[0], b64(claims.to_string().as_bytes()), p[2])
            }
        }),
        // The genuine claims and signature under another header (alg swapped, kid dropped).
        1 => header_object(vec![kid.clone()]).prop_map({
            let g = genuine.clone();
            move |h| {
                let p: Vec<&str> = g.split('.').collect();
                format!("{}.{}.{}", b64(h.to_string().as_bytes()), p[1], p[2])
            }
        }),
    ];
    check(forged, |token| {
        // A change the strict decoder cannot see is the same token, not a forgery.
        prop_assume!(parts(&token).as_ref() != Some(&genuine_parts));
        let r = rt.block_on(
            iss.verifier
                .check(&SecretString::from(token.clone()), &iss.endpoints),
        );
        prop_assert!(
            r.is_err(),
            "a token the IdP did not sign was accepted: {token}"
        );
        Ok(())
    });
    iss.h.assert_no_secrets_logged();
}

#[test]
fn hmac_tokens_keyed_with_the_issuers_public_key_are_refused() {
    // The classic algorithm confusion: HS256 with the RSA public key (from the JWKS) as the secret.
    let rt = runtime();
    let iss = rt.block_on(issuer());
    let jwks: Value = rt.block_on(async {
        http_client()
            .get(iss.h.idp.jwks_uri())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    let payload: Value = serde_json::from_slice(&parts(&iss.genuine).unwrap()[1]).unwrap();
    for key in jwks["keys"].as_array().unwrap() {
        for secret in [
            key["n"].as_str().unwrap().as_bytes().to_vec(),
            key.to_string().into_bytes(),
        ] {
            for alg in [
                jsonwebtoken::Algorithm::HS256,
                jsonwebtoken::Algorithm::HS512,
            ] {
                let mut header = jsonwebtoken::Header::new(alg);
                header.kid = key["kid"].as_str().map(String::from);
                let token = jsonwebtoken::encode(
                    &header,
                    &payload,
                    &jsonwebtoken::EncodingKey::from_secret(&secret).unwrap(),
                )
                .unwrap();
                let r = rt.block_on(
                    iss.verifier
                        .check(&SecretString::from(token), &iss.endpoints),
                );
                assert_eq!(r.err().map(|e| e.code()), Some("refused_algorithm"));
            }
        }
    }
}

#[test]
fn a_signed_token_whose_exp_overflows_the_clock_is_refused_not_a_panic() {
    // `exp` above i64::MAX seconds cannot be a `SystemTime`: `UNIX_EPOCH + Duration` panics.
    // The IdP signs such a token as readily as any other.
    let rt = runtime();
    let iss = rt.block_on(issuer());
    let off = Verifier::new(
        token_settings(false, UidCheck::Enforce, &iss.h.client_id),
        Some(AUDIENCE.to_string()),
        http_client(),
        clock::system(),
    );
    let mut panicked = Vec::new();
    for exp in [i64::MAX as u64 + 1, u64::MAX] {
        let token = iss
            .h
            .idp
            .mint(json!({ "uid": iss.h.client_id, "exp": exp }));
        for (what, verifier) in [("verify_signature = true", &iss.verifier), ("false", &off)] {
            let secret = SecretString::from(token.clone());
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                rt.block_on(verifier.check(&secret, &iss.endpoints))
            }));
            match r {
                Err(_) => panicked.push(format!("exp = {exp}, {what}")),
                Ok(r) => assert!(r.is_err(), "exp = {exp} accepted"),
            }
        }
    }
    assert!(
        panicked.is_empty(),
        "Verifier::check panicked for {panicked:?}"
    );
}

#[test]
fn an_issued_token_that_expires_after_year_9999_is_served_or_refused_never_a_panic() {
    // Checks accept any `exp` in the future; afterwards the token source formats `expires_at` as
    // RFC 3339 (log line, `status`), which humantime cannot do past 9999-12-31: its `Display`
    // fails and `to_string()` panics, inside the grant.
    let rt = runtime();
    let outcome = rt.block_on(async {
        let h = Harness::start().await;
        h.idp
            .set_fault(Some(Fault::Ttl(Duration::from_secs(300_000_000_000))));
        let tokens: TokenSource = h.source(&[], clock::system());
        let task = tokio::spawn(async move { tokens.get(Duration::ZERO).await.map(|_| ()) });
        task.await
    });
    match outcome {
        Ok(_) => {}
        Err(e) => panic!("getting a token with exp past year 9999 panicked: {e}"),
    }
}

// =============================================================================================
// IdP and cache input

#[test]
fn rate_limit_hints_from_the_idp_never_panic() {
    let number = prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        prop::sample::select(vec![
            "0".to_string(),
            (i64::MAX as u64).to_string(),
            (i64::MAX as u64 + 1).to_string(),
            u64::MAX.to_string(),
            "99999999999999999999999".to_string(),
        ]),
    ];
    let text = prop_oneof![
        2 => number,
        1 => "\\PC{0,30}",
        1 => Just("Sun, 06 Nov 1994 08:49:37 GMT".to_string()),
        1 => Just("Fri, 31 Dec 9999 23:59:59 GMT".to_string()),
        1 => Just("9999-12-31T23:59:59Z".to_string()),
    ];
    let input = (prop::option::of(text.clone()), prop::option::of(text));
    check(input, |(retry_after, reset)| {
        let mut headers = http::HeaderMap::new();
        for (name, v) in [("retry-after", retry_after), ("x-ratelimit-reset", reset)] {
            if let Some(v) = v.and_then(|v| http::HeaderValue::from_str(&v).ok()) {
                headers.insert(name, v);
            }
        }
        let _ = behest_agent::auth::http::wait_hint(&headers, SystemTime::now());
        Ok(())
    });
}

#[test]
fn an_x_ratelimit_reset_beyond_the_clock_is_not_a_panic() {
    let mut headers = http::HeaderMap::new();
    headers.insert("x-ratelimit-reset", u64::MAX.to_string().parse().unwrap());
    let r = std::panic::catch_unwind(|| {
        behest_agent::auth::http::wait_hint(&headers, SystemTime::now())
    });
    assert!(
        r.is_ok(),
        "wait_hint panicked on x-ratelimit-reset: {}",
        u64::MAX
    );
}

fn cache_key() -> Identity {
    Identity {
        issuer: ISSUER.to_string(),
        client_id: "client-1".to_string(),
        audience: Some(AUDIENCE.to_string()),
        resource: None,
        organization: None,
        scope: None,
    }
}

#[test]
fn a_corrupt_token_cache_file_is_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("token.json");
    let cache = DiskCache::new(path.clone(), cache_key());
    let key = serde_json::to_value(cache_key()).unwrap();
    let file = prop_oneof![
        1 => any::<String>(),
        1 => json_value().prop_map(|v| v.to_string()),
        4 => (any::<u64>(), json_value(), prop::option::of(0u32..3)).prop_map(move |(at, token, version)| {
            json!({
                "version": version.unwrap_or(1),
                "key": key,
                "access_token": token.as_str().unwrap_or("tok"),
                "obtained_at": at,
            })
            .to_string()
        }),
    ];
    check(file, |text| {
        std::fs::write(&path, &text).unwrap();
        let _ = cache.load();
        Ok(())
    });
}

// =============================================================================================
// The proxy: `/s/SESSION/` and path rewriting, header rewriting (over TCP)

/// A path segment, biased to the tricks that move a path: dot segments, encoded separators, `@`,
/// hosts, `;` parameters, NULs, overlong UTF-8.
fn segment(evil: String) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[A-Za-z0-9_~-]{1,6}",
        2 => Just("..".to_string()),
        1 => Just(".".to_string()),
        1 => Just(String::new()),
        3 => prop::sample::select(vec![
            "%2e%2e", "%2E%2e", ".%2e", "%2e.", "%2e", "%2f", "%2F", "%5c", "%5C", "%00", "%252e%252e",
            "..;", "%2e%2e;x", ";", ";x=..", "@", "evil.example", "%40", "%3f", "%23", "s", "v1", "%",
            "%zz", "%c0%ae%c0%ae", "%e2%80%ae", "..%2f", "%2e%2e%2f..", "~", "$", "!", "'", "*",
        ])
        .prop_map(String::from),
        1 => "%[0-9A-Fa-f]{2}",
        1 => Just(evil.clone()),
        1 => Just(format!("user@{evil}")),
    ]
}

/// A request target: origin-form paths with or without `/s/ID/` (the ID itself tricky at
/// times), `//host` paths, absolute-form targets, and raw visible ASCII.
fn target(up: String, evil: String) -> impl Strategy<Value = String> {
    let sid = prop_oneof![
        3 => "[A-Za-z0-9._~-]{1,10}",
        1 => segment(evil.clone()),
        1 => "%[0-9A-Fa-f]{2}[a-z]{0,3}",
    ];
    let query = prop::option::of("[a-z0-9=&%._/?-]{0,12}");
    let path = (
        prop::option::of(sid),
        prop::collection::vec(segment(evil.clone()), 0..7),
        any::<bool>(),
        query,
    )
        .prop_map(|(sid, segs, double, query)| {
            let mut t = String::new();
            if let Some(s) = sid {
                t.push_str("/s/");
                t.push_str(&s);
            }
            if double {
                t.push('/');
            }
            t.push('/');
            t.push_str(&segs.join("/"));
            if let Some(q) = query {
                t.push('?');
                t.push_str(&q);
            }
            t
        });
    let absolute = (
        prop::sample::select(vec!["http", "https", "ftp", "HTTP"]),
        prop::option::of(prop::sample::select(vec![
            "user@".to_string(),
            "u:p@".to_string(),
            format!("{up}@"),
            format!("{evil}@"),
        ])),
        prop::sample::select(vec![
            up.clone(),
            evil.clone(),
            "evil.example".to_string(),
            format!("localhost:{}", up.rsplit(':').next().unwrap()),
        ]),
        prop::collection::vec(segment(evil.clone()), 0..5),
        any::<bool>(),
    )
        .prop_map(|(scheme, userinfo, host, segs, base)| {
            format!(
                "{scheme}://{}{host}{}/{}",
                userinfo.unwrap_or_default(),
                if base { "/base" } else { "" },
                segs.join("/")
            )
        });
    prop_oneof![
        6 => path,
        2 => absolute,
        1 => "[!-~]{0,40}",
    ]
}

/// The session id the proxy should send for `target`, if it starts with `/s/`.
fn has_session_prefix(target: &str) -> bool {
    target.starts_with("/s/")
}

#[test]
fn proxied_requests_never_change_the_upstream_host_or_leave_the_base_path() {
    let rt = runtime();
    let rig = rt.block_on(Rig::start());
    let up = rig.up_authority();
    let evil = rig.evil.addr.to_string();
    let host = rig.host();
    // [forwarded, refused]: both must happen, or the generator tests nothing.
    let outcomes = std::sync::Mutex::new([0usize; 2]);
    check(target(up.clone(), evil), |target| {
        let before = rig.up.request_count();
        let req = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let out = rt.block_on(rig.probe(req.as_bytes()));
        let after = rig.up.request_count();
        outcomes.lock().unwrap()[usize::from(out.refused())] += 1;
        prop_assert!(
            !(500..600).contains(&out.status),
            "{target}: the proxy answered {}",
            out.text
        );
        prop_assert_eq!(rig.evil.hits(), 0, "{} reached the evil listener", target);
        if out.refused() {
            prop_assert_eq!(after, before, "{} refused yet forwarded", target);
            return Ok(());
        }
        prop_assert!(out.forwarded, "{}: {}", target, out.text);
        prop_assert_eq!(after, before + 1, "{}", target);
        let seen = rig.up.requests().pop().unwrap();
        prop_assert_eq!(seen.header_values("host"), vec![up.as_str()], "{}", target);
        prop_assert!(under_base(path_of(&seen)), "{target} went to {}", seen.path);
        if !target.contains('#') && !target.contains("://") {
            let client_query = target.split_once('?').map(|(_, q)| q);
            prop_assert_eq!(query_of(&seen), client_query, "{}", target);
        }
        if has_session_prefix(&target) {
            prop_assert_eq!(seen.header_values("x-session-id").len(), 1, "{}", target);
        }
        prop_assert!(rig.carries_only_the_agents_bearer(&seen), "{:?}", seen);
        Ok(())
    });
    let [forwarded, refused] = *outcomes.lock().unwrap();
    assert!(
        forwarded > 0 && refused > 0,
        "forwarded {forwarded}, refused {refused}"
    );
    rt.block_on(rig.finish());
}

/// `name` with each letter's case chosen by `upper`.
fn recase(name: &str, upper: &[bool]) -> String {
    name.chars()
        .zip(upper.iter().cycle())
        .map(|(c, &u)| if u { c.to_ascii_uppercase() } else { c })
        .collect()
}

#[derive(Debug, Clone)]
struct Credentials {
    /// Unique per case: the upstream must never see it.
    marker: String,
    /// (name, value) fields in the order sent.
    fields: Vec<(String, String)>,
    method: &'static str,
    h2c: bool,
}

fn credentials() -> impl Strategy<Value = Credentials> {
    let value = (
        prop::sample::select(vec![
            "Bearer ",
            "Basic ",
            "",
            "bearer\t",
            "Negotiate ",
            "Bearer  ",
        ]),
        "[ -~]{0,24}",
    );
    let cred = |name: &'static str| {
        (prop::collection::vec(any::<bool>(), 1..8), value.clone())
            .prop_map(move |(up, (scheme, rest))| (recase(name, &up), scheme.to_string(), rest))
    };
    let creds = prop::collection::vec(
        prop_oneof![cred("authorization"), cred("proxy-authorization")],
        0..6,
    );
    let others = prop::collection::vec(("x-[a-z0-9-]{1,10}", "[!-~]{1,12}"), 0..4);
    let connection = prop::option::of(prop::collection::vec(
        prop::sample::select(vec![
            "keep-alive",
            "authorization",
            "Proxy-Authorization",
            "x-a",
            "te",
            "upgrade",
        ]),
        1..4,
    ));
    (
        "[0-9a-f]{16}",
        creds,
        others,
        connection,
        prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(id, creds, others, connection, method, h2c)| {
            let marker = format!("cli-{id}");
            let mut fields: Vec<(String, String)> = creds
                .into_iter()
                .map(|(name, scheme, rest)| (name, format!("{scheme}{marker}{}", rest.trim_end())))
                .collect();
            fields.extend(others);
            if let Some(c) = connection {
                fields.push(("Connection".to_string(), c.join(", ")));
            }
            Credentials {
                marker,
                fields,
                method,
                h2c,
            }
        })
        .prop_flat_map(|c| {
            let Credentials {
                marker,
                fields,
                method,
                h2c,
            } = c;
            Just(fields)
                .prop_shuffle()
                .prop_map(move |fields| Credentials {
                    marker: marker.clone(),
                    fields,
                    method,
                    h2c,
                })
        })
}

/// Sends one request over h2c prior knowledge with these fields; returns the status.
async fn send_h2c(rig: &Rig, c: &Credentials) -> u16 {
    let io = TcpStream::connect(rig.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(c.method)
        .uri(format!("http://{}/v1/models", rig.host()));
    for (name, value) in &c.fields {
        // Connection-specific fields are not allowed on h2 at all.
        if name.eq_ignore_ascii_case("connection") {
            continue;
        }
        req = req.header(name.as_str(), value.as_str());
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(20), send.send_request(req)).await {
        Ok(Ok(r)) => r.status().as_u16(),
        Ok(Err(e)) => panic!("h2c request failed: {e}"),
        Err(_) => panic!("h2c request hung"),
    }
}

#[test]
fn client_credentials_never_reach_the_upstream_and_the_agent_bearer_goes_exactly_once() {
    let rt = runtime();
    let rig = rt.block_on(Rig::start());
    check(credentials(), |c| {
        let before = rig.up.request_count();
        let status = if c.h2c {
            rt.block_on(send_h2c(&rig, &c))
        } else {
            let mut head = format!(
                "{} /s/job-1/v1/models HTTP/1.1\r\nHost: {}\r\n",
                c.method,
                rig.host()
            );
            for (name, value) in &c.fields {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str("Content-Length: 2\r\n\r\n{}");
            rt.block_on(rig.probe(head.as_bytes())).status
        };
        prop_assert!(status != 0 && status < 500, "{} {:?}", status, c);
        prop_assert_eq!(rig.up.request_count(), before + 1, "{:?}", c);
        let last = rig.up.requests().pop().unwrap();
        prop_assert!(
            rig.carries_only_the_agents_bearer(&last),
            "{:?} {:?}",
            last,
            c
        );
        // Authorization values are redacted in the record: a credential forwarded under another
        // name would show.
        let mut fields = last.headers.iter().chain(&last.trailers);
        prop_assert!(
            fields.all(|(_, v)| !v.contains(&c.marker)),
            "a client credential reached the upstream: {:?}",
            last
        );
        Ok(())
    });
    rt.block_on(rig.finish());
}

#[test]
fn unsigned_tokens_are_refused_for_their_algorithm() {
    // `alg: none` is not a header jsonwebtoken reads: the refusal names the algorithm, not a
    // malformed header.
    let rt = runtime();
    let iss = rt.block_on(issuer());
    let payload = &parts(&iss.genuine).unwrap()[1];
    for alg in ["none", "None", "HS1024"] {
        let header = json!({ "alg": alg, "typ": "JWT" }).to_string();
        let token = format!("{}.{}.", b64(header.as_bytes()), b64(payload));
        let r = rt.block_on(
            iss.verifier
                .check(&SecretString::from(token), &iss.endpoints),
        );
        let e = r.expect_err("an unsigned token was accepted");
        assert_eq!(e.code(), "refused_algorithm", "{alg}: {}", e.problem());
        assert!(e.problem().contains(alg), "{}", e.problem());
    }
}
