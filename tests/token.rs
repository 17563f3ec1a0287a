//! The token engine against the embedded IdP: each client-auth method, the checks, single-flight,
//! refresh timing and backoff (with paused time), the disk cache, and the secret-leak check.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use behest_agent::auth::GrantError;
use behest_agent::clock::{self, TestClock};
use behest_agent::config::{self, LoadOptions};
use behest_agent::token::source::backoff;
use behest_agent::token::{CheckError, MIN_GRANT_INTERVAL, RefreshError, TokenError};
use devkit::idp::{AuthMethod, ClientKey, Fault};
use secrecy::ExposeSecret;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::util::{Harness, devkit_now, eventually, mode_of};

const NO_CACHE: (&str, &str) = ("BEHEST_AGENT__TOKEN__CACHE_FILE", "");

fn rejected(err: TokenError) -> CheckError {
    match err {
        TokenError::Unavailable {
            last_error: Some(RefreshError::Check(c)),
        } => c,
        other => panic!("expected a refused token, got: {other}"),
    }
}

#[tokio::test]
async fn client_secret_post_grant_yields_a_checked_token() {
    let h = Harness::start().await;
    let source = h.source(&[NO_CACHE], clock::system());
    let t = source.get(Duration::ZERO).await.expect("a token");
    h.remember(t.secret().expose_secret());
    let view = t.claims.view();
    assert_eq!(view.uid.as_deref(), Some(h.client_id.as_str()));
    assert_eq!(view.tid.as_deref(), Some("dev-tenant"));
    assert_eq!(view.aud, vec![crate::util::AUDIENCE.to_string()]);
    let g = h.idp.last_grant().unwrap();
    assert_eq!(g.auth_method, AuthMethod::ClientSecretPost);
    assert_eq!(g.audience.as_deref(), Some(crate::util::AUDIENCE));
    assert_eq!(
        g.content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    h.assert_no_secrets_logged();
}

#[tokio::test]
async fn client_secret_basic_grant_sends_http_basic_and_no_secret_in_the_form() {
    let h = Harness::start().await;
    let source = h.source(
        &[
            NO_CACHE,
            ("BEHEST_AGENT__AUTH__CLIENT_AUTH", "client_secret_basic"),
        ],
        clock::system(),
    );
    let t = source.get(Duration::ZERO).await.expect("a token");
    h.remember(t.secret().expose_secret());
    let g = h.idp.last_grant().unwrap();
    assert_eq!(g.auth_method, AuthMethod::ClientSecretBasic);
    h.assert_no_secrets_logged();
}

#[tokio::test]
async fn private_key_jwt_grant_signs_a_fresh_assertion_each_time() {
    let (pem, public) = ClientKey::generate_rsa();
    let h = Harness::start_with(|o| o.client_public_key = Some(public)).await;
    let key_file = h.path("client-key.pem");
    std::fs::write(&key_file, pem.expose_secret()).unwrap();
    crate::util::set_mode(&key_file, 0o600);
    h.remember(pem.expose_secret().lines().nth(3).unwrap());
    let source = h.source(
        &[
            NO_CACHE,
            ("BEHEST_AGENT__AUTH__CLIENT_AUTH", "private_key_jwt"),
            (
                "BEHEST_AGENT__AUTH__PRIVATE_KEY_FILE",
                key_file.to_str().unwrap(),
            ),
        ],
        clock::system(),
    );
    let t = source.get(Duration::ZERO).await.expect("a token");
    h.remember(t.secret().expose_secret());
    assert_eq!(
        h.idp.last_grant().unwrap().auth_method,
        AuthMethod::PrivateKeyJwt
    );
    assert!(!h.idp.last_grant().unwrap().client_secret_sent);
    // The IdP refuses a replayed jti, so a second grant only works with a new assertion.
    let t2 = source
        .refresh_now()
        .await
        .expect("a second grant with a new assertion");
    h.remember(t2.secret().expose_secret());
    assert_eq!(h.idp.grants(), 2);
    h.assert_no_secrets_logged();
}

#[tokio::test]
async fn private_key_jwt_with_an_es256_key() {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let private = pem("PRIVATE KEY", pair.to_pkcs8v1().unwrap().as_ref());
    let public = pem("PUBLIC KEY", pair.public_key().as_der().unwrap().as_ref());
    let key = ClientKey::from_pem(&public).expect("a P-256 public key");
    let h = Harness::start_with(|o| o.client_public_key = Some(key)).await;
    let key_file = h.path("client-key.pem");
    std::fs::write(&key_file, &private).unwrap();
    crate::util::set_mode(&key_file, 0o600);
    let source = h.source(
        &[
            NO_CACHE,
            ("BEHEST_AGENT__AUTH__CLIENT_AUTH", "private_key_jwt"),
            ("BEHEST_AGENT__AUTH__SIGNING_ALG", "ES256"),
            ("BEHEST_AGENT__AUTH__KEY_ID", "cred-es256"),
            (
                "BEHEST_AGENT__AUTH__PRIVATE_KEY_FILE",
                key_file.to_str().unwrap(),
            ),
        ],
        clock::system(),
    );
    source
        .get(Duration::ZERO)
        .await
        .expect("an ES256 assertion is accepted");
    assert_eq!(
        h.idp.last_grant().unwrap().auth_method,
        AuthMethod::PrivateKeyJwt
    );
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let body: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        body.join("\n")
    )
}

#[tokio::test]
async fn thousand_concurrent_gets_on_an_empty_cache_make_one_grant() {
    let h = Harness::start_with(|o| o.token_ttl = Duration::from_secs(3600)).await;
    let source = h.source(&[], clock::system());
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let s = source.clone();
        tasks.push(tokio::spawn(async move {
            s.get(Duration::ZERO).await.map(|t| t.expires_at)
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("every caller gets the token");
    }
    assert_eq!(h.idp.grants(), 1);
    assert_eq!(h.idp.token_requests(), 1);
}

#[tokio::test]
async fn concurrent_gets_during_a_failing_grant_share_its_error() {
    let h = Harness::start().await;
    h.idp.set_fault(Some(Fault::Status(503)));
    let source = h.source(&[NO_CACHE], clock::system());
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let s = source.clone();
        tasks.push(tokio::spawn(
            async move { s.get(Duration::ZERO).await.err() },
        ));
    }
    for t in tasks {
        let e = t.await.unwrap().expect("no token while the IdP fails");
        assert!(e.to_string().contains("503"), "{e}");
    }
    assert_eq!(
        h.idp.token_requests(),
        1,
        "one grant attempt, not one per caller"
    );
}

#[tokio::test]
async fn token_without_uid_is_refused_and_the_error_gives_the_auth0_action() {
    let h = Harness::start().await;
    h.idp.set_fault(Some(Fault::MissingUid));
    let source = h.source(&[NO_CACHE], clock::system());
    let err = source.get(Duration::ZERO).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(rejected(err), CheckError::UidMissing { .. }));
    assert!(msg.contains("onExecuteCredentialsExchange"), "{msg}");
    assert!(
        msg.contains("setCustomClaim(\"uid\", event.client.client_id)"),
        "{msg}"
    );
    assert!(
        source.current().is_none(),
        "a refused token is never served"
    );
    // With another uid claim configured, the Action sets that one.
    let source = h.source(
        &[NO_CACHE, ("BEHEST_AGENT__TOKEN__UID_CLAIM", "client_uid")],
        clock::system(),
    );
    let msg = source.get(Duration::ZERO).await.unwrap_err().to_string();
    assert!(
        msg.contains("setCustomClaim(\"client_uid\", event.client.client_id)"),
        "{msg}"
    );
}

#[tokio::test]
async fn token_with_another_uid_is_refused_naming_both_values() {
    let h = Harness::start().await;
    h.idp
        .set_fault(Some(Fault::WrongUid("someone-else".into())));
    let source = h.source(&[NO_CACHE], clock::system());
    let err = source.get(Duration::ZERO).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(rejected(err), CheckError::UidMismatch { .. }));
    assert!(
        msg.contains("someone-else") && msg.contains(&h.client_id),
        "{msg}"
    );
}

/// A refusal shows exactly what differs: a `uid` with a trailing space, a control character or a
/// look-alike letter is escaped (all three read `c1` before), one that is not a string is shown as
/// its JSON (it was "no `uid` claim"); a token without `iss` says so (it was "(empty body)").
#[tokio::test]
async fn refusals_show_exactly_what_differs() {
    let h = Harness::start().await;
    let source = h.source(&[NO_CACHE], clock::system());
    let id = h.client_id.clone();
    let cases = [
        (
            json!({ "uid": format!("{id} ") }),
            format!("claim is \"{id} \""),
        ),
        (
            json!({ "uid": format!("{id}\u{0}") }),
            format!("claim is \"{id}\\u{{0}}\""),
        ),
        (
            json!({ "uid": format!("\u{441}{}", &id[1..]) }),
            format!("claim is \"\\u{{441}}{}\"", &id[1..]),
        ),
        (
            json!({ "uid": [id] }),
            format!("claim is [\"{id}\"] (not a string)"),
        ),
        (json!({ "iss": null }), "names no issuer".to_string()),
        (json!({ "iss": 1 }), "issuer 1 (not a string)".to_string()),
        // An `azp` that is not a string was not checked at all: the token was served.
        (
            json!({ "azp": ["other-client"] }),
            "its `azp` claim is [\"other-client\"] (not a string)".to_string(),
        ),
        (
            json!({ "iss": format!("{}/", h.idp.base_url().trim_end_matches('/')) + "/" }),
            "is not".to_string(),
        ),
    ];
    for (claims, said) in cases {
        h.idp.set_fault(Some(Fault::Claims(claims.clone())));
        let msg = source.refresh_now().await.unwrap_err().to_string();
        assert!(msg.contains(&said), "{claims}: {msg}");
    }
}

/// A token response over 256 KiB is a malformed answer from the IdP, not an IdP out of reach
/// (whose advice is DNS, firewall and proxies).
#[tokio::test]
async fn an_oversize_token_response_is_malformed_not_unreachable() {
    let h = Harness::start().await;
    let source = h.source(&[NO_CACHE], clock::system());
    h.idp
        .set_fault(Some(Fault::ExpiresIn(json!("9".repeat(300 * 1024)))));
    let err = source.refresh_now().await.unwrap_err();
    assert!(
        matches!(err, RefreshError::Grant(GrantError::Malformed(ref m)) if m.contains("256 KiB")),
        "{err:?}"
    );
}

#[tokio::test]
async fn uid_check_warn_serves_a_token_without_uid_with_a_warning() {
    let h = Harness::start().await;
    h.idp.set_fault(Some(Fault::MissingUid));
    let source = h.source(
        &[NO_CACHE, ("BEHEST_AGENT__TOKEN__UID_CHECK", "warn")],
        clock::system(),
    );
    let t = source.get(Duration::ZERO).await.expect("served under warn");
    assert!(
        t.warnings.iter().any(|w| w.contains("uid")),
        "{:?}",
        t.warnings
    );
}

fn unix_now() -> u64 {
    clock::system().unix()
}

#[tokio::test]
async fn a_token_not_valid_yet_is_refused_naming_the_claim_and_the_clock() {
    for claim in ["nbf", "iat"] {
        let h = Harness::start().await;
        let future = unix_now() + 3600;
        h.idp
            .set_fault(Some(Fault::Claims(serde_json::json!({ claim: future }))));
        let source = h.source(&[NO_CACHE], clock::system());
        let err = source.get(Duration::ZERO).await.unwrap_err();
        let msg = err.to_string();
        let check = rejected(err);
        assert!(
            matches!(check, CheckError::NotYetValid { claim: c, .. } if c == claim),
            "{claim}: {msg}"
        );
        assert!(msg.contains("timedatectl"), "{msg}");
        assert!(
            source.current().is_none(),
            "a token not valid yet is never served"
        );
    }
}

#[tokio::test]
async fn a_token_issued_a_little_ahead_of_this_clock_is_served() {
    let h = Harness::start().await;
    let ahead = unix_now() + 20;
    h.idp.set_fault(Some(Fault::Claims(
        serde_json::json!({ "nbf": ahead, "iat": ahead }),
    )));
    let source = h.source(&[NO_CACHE], clock::system());
    source
        .get(Duration::ZERO)
        .await
        .expect("within the minute of leeway");
}

#[tokio::test]
async fn a_token_of_another_client_is_refused_even_under_uid_check_warn() {
    for (claim, value) in [
        ("azp", "someone-else".to_string()),
        ("sub", "someone-else@clients".to_string()),
        ("client_id", "someone-else".to_string()),
    ] {
        let h = Harness::start().await;
        h.idp.set_fault(Some(Fault::Claims(
            serde_json::json!({ "uid": null, claim: value }),
        )));
        let source = h.source(
            &[NO_CACHE, ("BEHEST_AGENT__TOKEN__UID_CHECK", "warn")],
            clock::system(),
        );
        let err = source.get(Duration::ZERO).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(rejected(err), CheckError::ClientMismatch { claim: c, .. } if c == claim),
            "{claim}: {msg}"
        );
        assert!(
            msg.contains("someone-else") && msg.contains(&h.client_id),
            "{msg}"
        );
    }
}

#[tokio::test]
async fn a_fractional_exp_and_an_odd_expires_in_are_accepted() {
    let h = Harness::start().await;
    let exp = unix_now() as f64 + 600.5;
    h.idp
        .set_fault(Some(Fault::Claims(serde_json::json!({ "exp": exp }))));
    let source = h.source(&[NO_CACHE], clock::system());
    let t = source
        .get(Duration::ZERO)
        .await
        .expect("exp = n.5 is a time");
    assert_eq!(t.claims.exp, exp as u64);

    for expires_in in [
        serde_json::json!(-1),
        serde_json::json!(599.5),
        serde_json::json!("600"),
    ] {
        let h = Harness::start().await;
        h.idp.set_fault(Some(Fault::ExpiresIn(expires_in.clone())));
        let source = h.source(&[NO_CACHE], clock::system());
        source
            .get(Duration::ZERO)
            .await
            .unwrap_or_else(|e| panic!("expires_in {expires_in}: {e}"));
    }
}

#[tokio::test]
async fn a_secret_file_with_a_bom_and_surrounding_whitespace_still_grants() {
    let h = Harness::start().await;
    for text in [
        format!("\u{feff}{}\n", h.secret),
        format!("  {}\t\r\n", h.secret),
        format!("\n{}\n\n", h.secret),
    ] {
        std::fs::write(h.path("client-secret"), &text).unwrap();
        let source = h.source(&[NO_CACHE], clock::system());
        source
            .get(Duration::ZERO)
            .await
            .unwrap_or_else(|e| panic!("{text:?}: {e}"));
    }
}

#[tokio::test]
async fn a_secret_file_with_a_second_line_or_a_nul_is_refused_at_load_and_by_the_grant() {
    let h = Harness::start().await;
    for (text, want) in [
        (format!("{}\nsecond\n", h.secret), "more than one line"),
        (format!("{}\0\n", &h.secret[..8]), "control character"),
    ] {
        std::fs::write(h.path("client-secret"), &text).unwrap();
        let err = config::load(&LoadOptions {
            path: None,
            default_path: None,
            env: h.env(&[NO_CACHE]),
            overrides: vec![],
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("auth.client_secret_file") && err.contains(want),
            "{err}"
        );
        // A file changed after the daemon started: the grant says the same, not `invalid_client`.
        std::fs::write(h.path("client-secret"), &h.secret).unwrap();
        let source = h.source(&[NO_CACHE], clock::system());
        std::fs::write(h.path("client-secret"), &text).unwrap();
        let err = source.refresh_now().await.unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
        assert_eq!(h.idp.grants(), 0, "nothing sent to the IdP");
        assert!(!err.contains(&h.secret[..8]), "{err}");
    }
}

#[tokio::test]
async fn expected_uid_overrides_the_client_id() {
    let h = Harness::start().await;
    h.idp.set_fault(Some(Fault::WrongUid("machine-7".into())));
    let source = h.source(
        &[NO_CACHE, ("BEHEST_AGENT__TOKEN__EXPECTED_UID", "machine-7")],
        clock::system(),
    );
    source
        .get(Duration::ZERO)
        .await
        .expect("uid matches expected_uid");
}

#[tokio::test]
async fn opaque_token_is_refused_with_a_hint_to_set_the_audience() {
    let h = Harness::start().await;
    h.idp.set_fault(Some(Fault::OpaqueToken));
    let source = h.source(&[NO_CACHE], clock::system());
    let err = source.get(Duration::ZERO).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(rejected(err), CheckError::Opaque));
    assert!(msg.contains("auth.audience"), "{msg}");
}

#[tokio::test]
async fn token_with_a_bad_signature_is_refused() {
    let h = Harness::start().await;
    h.idp.set_fault(Some(Fault::BadSignature));
    let source = h.source(&[NO_CACHE], clock::system());
    let err = source.get(Duration::ZERO).await.unwrap_err();
    assert!(matches!(rejected(err), CheckError::Signature(_)));
}

#[tokio::test]
async fn expired_token_is_refused() {
    let h = Harness::start().await;
    h.idp.set_fault(Some(Fault::Expired));
    let source = h.source(&[NO_CACHE], clock::system());
    let err = source.get(Duration::ZERO).await.unwrap_err();
    assert!(matches!(rejected(err), CheckError::Expired(_)));
}

#[tokio::test]
async fn token_signed_by_a_key_not_in_the_jwks_is_refused_after_one_refetch() {
    let h = Harness::start().await;
    h.idp.set_fault(Some(Fault::UnknownKid));
    let source = h.source(&[NO_CACHE], clock::system());
    let err = source.get(Duration::ZERO).await.unwrap_err();
    assert!(matches!(rejected(err), CheckError::UnknownKid(_)));
    assert_eq!(
        h.idp.jwks_requests(),
        1,
        "an empty cache fetches once, and that fetch is the refetch"
    );
}

#[tokio::test]
async fn key_rotation_is_followed_by_refetching_the_jwks_on_an_unknown_kid() {
    let h = Harness::start().await;
    let source = h.source(&[NO_CACHE], clock::system());
    source.get(Duration::ZERO).await.expect("first token");
    assert_eq!(h.idp.jwks_requests(), 1);
    h.idp.rotate_key(false);
    source
        .refresh_now()
        .await
        .expect("a token signed with the new key is accepted");
    assert_eq!(h.idp.jwks_requests(), 2, "the JWKS was fetched again once");
    source.refresh_now().await.expect("third token");
    assert_eq!(h.idp.jwks_requests(), 2, "known kid: no more fetches");
}

#[tokio::test]
async fn min_ttl_longer_than_the_idp_issues_is_an_error_after_one_grant() {
    let h = Harness::start_with(|o| o.token_ttl = Duration::from_secs(60)).await;
    let source = h.source(&[NO_CACHE], clock::system());
    let err = source.get(Duration::from_secs(600)).await.unwrap_err();
    assert!(matches!(err, TokenError::TooShort { .. }), "{err}");
    assert!(err.to_string().contains("less than"), "{err}");
    assert_eq!(h.idp.grants(), 1);
}

#[tokio::test]
async fn a_token_another_process_cached_too_short_for_min_ttl_is_replaced_by_one_grant() {
    let h = Harness::start().await;
    h.idp.fail_next(1, Fault::Ttl(Duration::from_secs(30)));
    let other = h.source(&[], clock::system());
    other
        .get(Duration::ZERO)
        .await
        .expect("a 30 s token, cached");
    assert_eq!(h.idp.grants(), 1);
    let source = h.source(&[], clock::system());
    let t = source
        .get(Duration::from_secs(60))
        .await
        .expect("one grant gives a token valid long enough");
    assert!(t.remaining(std::time::SystemTime::now()) >= Duration::from_secs(60));
    assert_eq!(h.idp.grants(), 2);
}

#[tokio::test]
async fn a_rotated_secret_file_is_used_at_the_next_grant_without_restart() {
    let h = Harness::start().await;
    std::fs::write(h.path("client-secret"), "wrong-secret-value\n").unwrap();
    let source = h.source(&[NO_CACHE], clock::system());
    let err = source.refresh_now().await.unwrap_err();
    assert_eq!(err.code(), "invalid_client", "{err}");
    assert!(err.is_config_error());
    std::fs::write(h.path("client-secret"), format!("{}\n", h.secret)).unwrap();
    source
        .refresh_now()
        .await
        .expect("the new secret is read at the next grant");
}

/// A new engine on the same disk cache (a reload's, another command's) honours the wait the IdP
/// told the last one, and schedules its next try after it.
#[tokio::test]
async fn a_new_engine_honours_the_wait_the_idp_told_the_last_one() {
    let h = Harness::start().await;
    h.idp.set_fault(Some(Fault::TooManyRequests {
        retry_after: Some(600),
        reset_in: None,
    }));
    let first = h.source(&[], clock::system());
    assert!(first.get(Duration::ZERO).await.is_err());
    let asked = h.idp.token_requests();
    let second = h.source(&[], clock::system());
    let err = second.get(Duration::ZERO).await.unwrap_err().to_string();
    assert!(err.contains("told an earlier grant to wait"), "{err}");
    assert!(second.refresh_now().await.is_err());
    assert_eq!(h.idp.token_requests(), asked);
    let next = second.status().next_refresh.expect("a next try");
    let next = humantime::parse_rfc3339(&next).unwrap();
    assert!(
        next > SystemTime::now() + Duration::from_secs(500),
        "{next:?}"
    );
}

/// A forced refresh that fails while the token is good is not tried again before the token is
/// due, and `status` says when that is rather than a retry time that passes unused.
#[tokio::test]
async fn a_failed_forced_refresh_leaves_the_next_refresh_at_the_tokens_own_time() {
    let h = Harness::start().await;
    let source = h.source(&[NO_CACHE], clock::system());
    source.get(Duration::ZERO).await.expect("a token");
    let due = source.status().next_refresh.expect("a refresh time");
    h.idp.fail_next(1, Fault::Status(502));
    assert!(source.refresh_now().await.is_err());
    let status = source.status();
    assert_eq!(status.consecutive_failures, 1);
    assert_eq!(status.next_refresh.as_deref(), Some(due.as_str()));
}

#[tokio::test]
async fn idp_errors_keep_code_status_description_and_retry_after() {
    let h = Harness::start().await;
    let source = h.source(&[NO_CACHE], clock::system());
    h.idp.fail_next(
        1,
        Fault::TooManyRequests {
            retry_after: Some(17),
            reset_in: None,
        },
    );
    let err = source.refresh_now().await.unwrap_err();
    match &err {
        RefreshError::Grant(GrantError::Refused {
            status,
            error,
            retry_after,
            ..
        }) => {
            assert_eq!(*status, 429);
            assert_eq!(error, "too_many_requests");
            assert_eq!(*retry_after, Some(Duration::from_secs(17)));
        }
        other => panic!("unexpected {other:?}"),
    }
    // While that wait runs, a refresh does not ask the IdP again.
    let asked = h.idp.token_requests();
    let again = source.refresh_now().await.unwrap_err();
    assert_eq!(again.code(), err.code());
    assert_eq!(h.idp.token_requests(), asked);
    // A source for each of the others (the wait above would hold them off).
    let source = h.source(&[NO_CACHE], clock::system());
    h.idp.fail_next(1, Fault::Status(502));
    let err = source.refresh_now().await.unwrap_err();
    assert!(
        matches!(
            err,
            RefreshError::Grant(GrantError::Http { status: 502, .. })
        ),
        "{err:?}"
    );
    h.idp.fail_next(1, Fault::Malformed);
    assert!(matches!(
        source.refresh_now().await.unwrap_err(),
        RefreshError::Grant(GrantError::Malformed(_))
    ));
    h.idp.fail_next(1, Fault::Empty);
    assert!(matches!(
        source.refresh_now().await.unwrap_err(),
        RefreshError::Grant(GrantError::Malformed(_))
    ));
    h.idp.fail_next(
        1,
        Fault::Oauth {
            status: 403,
            error: "access_denied".into(),
            description: "Service not enabled".into(),
        },
    );
    let err = source.refresh_now().await.unwrap_err();
    assert!(
        err.to_string().contains("Service not enabled")
            && err.to_string().contains("auth.audience"),
        "{err}"
    );
}

/// RFC 6749 §7.1: a token of a type the agent does not understand is not used (it would be sent
/// as a Bearer token); `bearer` in any case is Bearer.
#[tokio::test]
async fn a_token_that_is_not_bearer_is_refused() {
    let h = Harness::start().await;
    let source = h.source(&[NO_CACHE], clock::system());
    for kind in ["MAC", "DPoP"] {
        h.idp.fail_next(1, Fault::TokenType(kind.into()));
        let err = source.refresh_now().await.unwrap_err();
        assert_eq!(err.code(), "malformed_response", "{err}");
        assert!(
            err.to_string().contains(&format!("token of type `{kind}`")),
            "{err}"
        );
    }
    for kind in ["bearer", "BEARER"] {
        h.idp.fail_next(1, Fault::TokenType(kind.into()));
        source
            .refresh_now()
            .await
            .expect("any case of Bearer is Bearer");
    }
}

/// A JWKS that is down (503) is an outage, retried from `min_backoff` as the token endpoint's
/// would be, not a setting to fix retried at the slow end.
#[tokio::test]
async fn a_jwks_outage_is_retried_as_an_outage() {
    let h = Harness::start().await;
    let source = h.source(&[NO_CACHE], clock::system());
    h.idp.fail_next(1, Fault::JwksDown);
    let err = source.refresh_now().await.unwrap_err();
    assert_eq!(err.code(), "jwks_unavailable", "{err}");
    assert!(!err.is_config_error(), "{err}");
    let wait = backoff(Duration::from_secs(1), Duration::from_secs(300), 1, &err);
    assert!(wait <= Duration::from_secs(2), "{wait:?}");
    source.refresh_now().await.expect("the JWKS is back");
}

/// A JWKS answer over 256 KiB is not read whole.
#[tokio::test]
async fn a_huge_jwks_is_refused_unread() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.read(&mut [0; 4096]).await;
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{\"keys\":[";
            let _ = s.write_all(head.as_bytes()).await;
            // 64 MiB of blanks, never all sent: the agent stops reading first.
            for _ in 0..1024 {
                if s.write_all(&[b' '; 64 * 1024]).await.is_err() {
                    break;
                }
            }
        }
    });
    let h = Harness::start().await;
    let issuer = h.idp.base_url();
    let token_url = format!("{}/oauth/token", issuer.trim_end_matches('/'));
    let source = h.source(
        &[
            NO_CACHE,
            ("BEHEST_AGENT__AUTH__DOMAIN", ""),
            ("BEHEST_AGENT__AUTH__PROVIDER", "oidc"),
            ("BEHEST_AGENT__AUTH__ISSUER", issuer.as_str()),
            ("BEHEST_AGENT__AUTH__TOKEN_URL", token_url.as_str()),
            ("BEHEST_AGENT__AUTH__JWKS_URL", url.as_str()),
        ],
        clock::system(),
    );
    let err = source.refresh_now().await.unwrap_err();
    assert!(err.to_string().contains("over 256 KiB"), "{err}");
}

/// An IdP that echoes the credential back (a debug page, a confused error code) never gets it
/// repeated: not in the error, its code (a metric label), `status`, nor the logs.
#[tokio::test]
async fn a_credential_the_idp_echoes_back_is_never_repeated() {
    use base64::Engine as _;
    let h = Harness::start().await;
    let source = h.source(&[NO_CACHE], clock::system());
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", h.client_id, h.secret));
    h.idp.fail_next(
        1,
        Fault::Oauth {
            status: 400,
            error: h.secret.clone(),
            description: format!("got secret {} and Basic {basic}", h.secret),
        },
    );
    let err = source.refresh_now().await.unwrap_err();
    let status = serde_json::to_string(&source.status()).unwrap();
    for text in [err.to_string(), err.code(), status] {
        assert!(
            !text.contains(&h.secret) && !text.contains(&basic),
            "{text}"
        );
    }
    assert!(err.to_string().contains("got secret [redacted]"), "{err}");
    assert_eq!(err.code(), "other", "a code no IdP standard names");
    // Taken out before the text is cut short: no head of it survives the cut either.
    h.idp.fail_next(
        1,
        Fault::Oauth {
            status: 400,
            error: "invalid_request".into(),
            description: format!("{}{}", "x".repeat(190), h.secret),
        },
    );
    // A source of its own: one forced grant's outcome is shared for a few seconds.
    let source = h.source(&[NO_CACHE], clock::system());
    let err = source.refresh_now().await.unwrap_err();
    let head = &h.secret[..8];
    assert!(
        err.to_string().contains("xxxx"),
        "this refusal's text: {err}"
    );
    assert!(!err.to_string().contains(head), "{err}");
    assert!(!crate::util::logs().contains(&basic));
    h.assert_no_secrets_logged();
}

/// A secret with characters form encoding changes (`~` is sent as `%7E`) is taken out of an
/// echo in every form it was sent in: form-encoded, in HTTP Basic of the encoded pair (RFC 6749
/// §2.3.1), and percent-decoded in lower case; only the plain one was.
#[tokio::test]
async fn a_secret_the_idp_echoes_back_form_encoded_is_never_repeated() {
    use base64::Engine as _;
    let secret = "Abc8Q~def+ghi/jk=l&m%20n!".to_string();
    let s = secret.clone();
    let h = Harness::start_with(move |o| o.client_secret = s.into()).await;
    std::fs::write(h.path("client-secret"), format!("{secret}\n")).unwrap();
    h.remember(&secret);
    let encoded: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{encoded}", h.client_id));
    let source = h.source(&[NO_CACHE], clock::system());
    source.refresh_now().await.expect("the secret works");
    let lower_hex = encoded
        .split('%')
        .enumerate()
        .map(|(i, part)| match i {
            0 => part.to_string(),
            _ => format!("%{}{}", part[..2].to_lowercase(), &part[2..]),
        })
        .collect::<String>();
    let twice: String = url::form_urlencoded::byte_serialize(encoded.as_bytes()).collect();
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let b64url = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
    let entities: String = secret.chars().map(|c| format!("&#{};", c as u32)).collect();
    let echoes = [
        format!("body was client_secret={encoded}&audience=x"),
        format!("Authorization: Basic {basic}"),
        format!("lower-case escapes {lower_hex}"),
        format!("twice: {twice}"),
        format!("unpadded: {}", basic.trim_end_matches('=')),
        format!(
            "base64url: {}",
            b64url(format!("{}:{encoded}", h.client_id).as_bytes())
        ),
        format!("base64 of it: {}", b64(secret.as_bytes())),
        format!("split: {}\n{}", &secret[..9], &secret[9..]),
        format!("hex: {hex}"),
        format!("html: {entities}"),
    ];
    for echo in echoes {
        h.idp.fail_next(
            1,
            Fault::Oauth {
                status: 400,
                error: "invalid_request".into(),
                description: echo.clone(),
            },
        );
        // A source of its own: one forced grant's outcome is shared for a few seconds.
        let source = h.source(&[NO_CACHE], clock::system());
        let err = source.refresh_now().await.unwrap_err();
        let said = err.to_string();
        assert!(
            said.contains("[redacted]") || said.contains("(withheld"),
            "{echo}: {said}"
        );
        let status = serde_json::to_string(&source.status()).unwrap();
        for text in [err.to_string(), status] {
            let lower = text.to_lowercase();
            assert!(
                !text.contains(&secret)
                    && !lower.contains(&encoded.to_lowercase())
                    && !text.contains(&lower_hex)
                    && !text.contains(basic.trim_end_matches('='))
                    && !text.contains(&twice)
                    && !text.contains(&b64(secret.as_bytes()))
                    && !text.contains(&hex)
                    && !text.contains(&secret[9..])
                    && !text.contains("&#"),
                "{echo}: {text}"
            );
        }
    }
    h.assert_no_secrets_logged();
}

#[test]
fn backoff_grows_exponentially_within_bounds_and_honours_retry_after() {
    let min = Duration::from_secs(1);
    let max = Duration::from_secs(60);
    let transient = RefreshError::Grant(GrantError::Transport {
        url: "x".into(),
        message: "refused".into(),
    });
    for failures in 1..40 {
        let d = backoff(min, max, failures, &transient);
        assert!(d >= min && d <= max, "failure {failures}: {d:?}");
    }
    // Exponential: the 7th failure waits at least half of 64 s capped at 60 s.
    assert!(backoff(min, max, 7, &transient) >= Duration::from_secs(30));
    let config = RefreshError::Grant(GrantError::Refused {
        status: 401,
        error: "invalid_client".into(),
        description: None,
        retry_after: None,
    });
    assert!(
        backoff(min, max, 1, &config) >= Duration::from_secs(30),
        "config errors retry at the slow end"
    );
    let limited = RefreshError::Grant(GrantError::Refused {
        status: 429,
        error: "too_many_requests".into(),
        description: None,
        retry_after: Some(Duration::from_secs(120)),
    });
    assert!(
        backoff(min, max, 1, &limited) >= Duration::from_secs(120),
        "Retry-After is a floor"
    );
}

// ---- timing, with tokio's clock paused and a wall clock that follows it

/// Runs `source`'s refresher until the returned token is cancelled.
fn spawn_refresher(
    source: &behest_agent::token::TokenSource,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let (s, c) = (source.clone(), stop.clone());
    (stop, tokio::spawn(async move { s.run(c).await }))
}

#[tokio::test(start_paused = true)]
async fn refresh_happens_before_expiry_and_not_earlier_than_the_margin() {
    let clock = TestClock::new();
    let ttl = Duration::from_secs(3600);
    let h = Harness::start_with(|o| {
        o.token_ttl = ttl;
        o.now = devkit_now(clock.clone());
    })
    .await;
    let source = h.source(
        &[NO_CACHE, ("BEHEST_AGENT__TOKEN__REFRESH_MARGIN", "5m")],
        clock.clone(),
    );
    let (stop, task) = spawn_refresher(&source);
    eventually(Duration::from_secs(60), "first grant", || {
        h.idp.grants() == 1
    })
    .await;
    // window = max(5m, 10% of 1h) = 6m, minus up to 25% jitter: refresh in [exp-7m30s, exp-6m].
    tokio::time::sleep(ttl - Duration::from_secs(8 * 60)).await;
    assert_eq!(h.idp.grants(), 1, "no refresh before the margin");
    tokio::time::sleep(Duration::from_secs(2 * 60 + 30)).await;
    assert_eq!(h.idp.grants(), 2, "refreshed before expiry");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn refresh_happens_on_wake_after_the_wall_clock_jumped_past_the_deadline() {
    let clock = TestClock::new();
    let h = Harness::start_with(|o| {
        o.token_ttl = Duration::from_secs(3600);
        o.now = devkit_now(clock.clone());
    })
    .await;
    let source = h.source(&[NO_CACHE], clock.clone());
    let (stop, task) = spawn_refresher(&source);
    eventually(Duration::from_secs(60), "first grant", || {
        h.idp.grants() == 1
    })
    .await;
    // The machine sleeps 58 minutes: the wall clock moves, tokio's monotonic timer does not.
    clock.jump(Duration::from_secs(58 * 60));
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(
        h.idp.grants(),
        2,
        "the refresher noticed the wall clock within 30 s"
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn idp_down_keeps_the_cached_token_until_it_expires_then_reports_unavailable_and_recovers() {
    let clock = TestClock::new();
    let h = Harness::start_with(|o| {
        o.token_ttl = Duration::from_secs(600);
        o.now = devkit_now(clock.clone());
    })
    .await;
    let source = h.source(&[NO_CACHE], clock.clone());
    let (stop, task) = spawn_refresher(&source);
    let first = source.get(Duration::ZERO).await.unwrap();
    h.idp.set_fault(Some(Fault::Status(503)));
    // Refresh is due ~4.5 min before expiry; the IdP fails; the old token is still served.
    tokio::time::sleep(Duration::from_secs(9 * 60)).await;
    assert!(h.idp.token_requests() > 1, "the refresher kept trying");
    let still = source
        .get(Duration::ZERO)
        .await
        .expect("cached token still served");
    assert!(Arc::ptr_eq(&first, &still));
    assert!(source.status().last_error.unwrap().contains("503"));
    // Attempts are bounded by the backoff (1 s doubling to 8 s here): a few dozen at most.
    assert!(
        h.idp.token_requests() < 100,
        "{} attempts",
        h.idp.token_requests()
    );
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert!(!source.is_ready());
    let err = source.get(Duration::ZERO).await.unwrap_err();
    assert!(err.to_string().contains("503"), "{err}");
    h.idp.set_fault(None);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(source.is_ready(), "recovered without restart");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn with_the_disk_cache_the_backoff_keeps_growing_after_the_held_token_expired() {
    let clock = TestClock::new();
    let h = Harness::start_with(|o| {
        o.token_ttl = Duration::from_secs(60);
        o.now = devkit_now(clock.clone());
    })
    .await;
    // The disk cache on: the token held is also the one on disk.
    let source = h.source(&[("BEHEST_AGENT__TOKEN__MAX_BACKOFF", "5m")], clock.clone());
    let (stop, task) = spawn_refresher(&source);
    source.get(Duration::ZERO).await.unwrap();
    h.idp.set_fault(Some(Fault::Status(503)));
    // Past the expiry, then ten minutes of outage.
    tokio::time::sleep(Duration::from_secs(60 + 600)).await;
    assert!(!source.is_ready());
    // 1 s doubling toward 5 min: a dozen attempts or so, never one a second.
    let attempts = h.idp.token_requests();
    assert!(attempts < 40, "{attempts} attempts in 11 minutes");
    assert!(
        source.status().consecutive_failures > 5,
        "{:?}",
        source.status()
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn retry_after_delays_the_next_attempt() {
    let clock = TestClock::new();
    let h = Harness::start_with(|o| o.now = devkit_now(clock.clone())).await;
    h.idp.fail_next(
        1,
        Fault::TooManyRequests {
            retry_after: Some(5),
            reset_in: None,
        },
    );
    let source = h.source(&[NO_CACHE], clock.clone());
    let (stop, task) = spawn_refresher(&source);
    eventually(Duration::from_secs(1), "first attempt", || {
        h.idp.token_requests() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(4800)).await;
    assert_eq!(h.idp.token_requests(), 1, "no retry before Retry-After");
    assert!(
        source.get(Duration::ZERO).await.is_err(),
        "requests during the backoff do not grant"
    );
    assert_eq!(h.idp.token_requests(), 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h.idp.grants(), 1);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_configuration_error_is_reported_loudly_once_per_change() {
    let clock = TestClock::new();
    let h = Harness::start_with(|o| o.now = devkit_now(clock.clone())).await;
    let marker = format!("marker-{}", crate::util::random(10));
    h.idp.set_fault(Some(Fault::Oauth {
        status: 401,
        error: "invalid_client".into(),
        description: marker.clone(),
    }));
    let source = h.source(&[NO_CACHE], clock.clone());
    let (stop, task) = spawn_refresher(&source);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(h.idp.token_requests() >= 3, "still retried at the slow end");
    let logs = crate::util::logs();
    let loud = logs
        .lines()
        .filter(|l| l.contains(&marker) && l.contains("ERROR"))
        .count();
    assert_eq!(loud, 1, "reported loudly once");
    stop.cancel();
    task.await.unwrap();
}

// ---- disk cache

#[tokio::test]
async fn the_cache_file_is_written_with_mode_0600_and_reused_after_restart_without_a_grant() {
    let h = Harness::start().await;
    let source = h.source(&[], clock::system());
    let t = source.get(Duration::ZERO).await.unwrap();
    h.remember(t.secret().expose_secret());
    let cache = h.path("state/token.json");
    assert_eq!(mode_of(&cache), 0o600);
    let granted_at = source.status().last_refresh.expect("a refresh");
    drop(source);
    // Restarted two minutes later.
    let later = TestClock::new();
    later.jump(Duration::from_secs(120));
    let restarted = h.source(&[], later);
    let loaded = restarted
        .load_cache()
        .await
        .expect("the cached token is loaded");
    assert_eq!(loaded.secret().expose_secret(), t.secret().expose_secret());
    assert_eq!(
        restarted.status().last_refresh.as_deref(),
        Some(granted_at.as_str()),
        "the last refresh is the grant's, not the restart's"
    );
    restarted.get(Duration::ZERO).await.unwrap();
    assert_eq!(h.idp.grants(), 1, "restart made no grant");
    h.assert_no_secrets_logged();
}

/// A cache file other users may read (restored from a backup, say) is not used: the next grant
/// replaces it with a 0600 one.
#[tokio::test]
async fn a_cache_file_others_may_read_is_not_used_and_is_replaced() {
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::start().await;
    let source = h.source(&[], clock::system());
    let t = source.get(Duration::ZERO).await.unwrap();
    h.remember(t.secret().expose_secret());
    drop(source);
    let cache = h.path("state/token.json");
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o644)).unwrap();
    let restarted = h.source(&[], clock::system());
    assert!(restarted.load_cache().await.is_none(), "not used");
    let t2 = restarted.get(Duration::ZERO).await.unwrap();
    h.remember(t2.secret().expose_secret());
    assert_eq!(h.idp.grants(), 2, "a new grant");
    assert_eq!(mode_of(&cache), 0o600);
    assert!(crate::util::logs().contains("other users may read it (mode 0644)"));
    h.assert_no_secrets_logged();
}

#[tokio::test]
async fn a_tampered_cache_file_is_discarded_and_a_new_token_granted() {
    let h = Harness::start().await;
    let source = h.source(&[], clock::system());
    let t = source.get(Duration::ZERO).await.unwrap();
    let cache = h.path("state/token.json");
    let text = std::fs::read_to_string(&cache).unwrap();
    // Change one claim character: the signature no longer verifies.
    let secret = t.secret().expose_secret().to_string();
    let mut parts: Vec<String> = secret.split('.').map(String::from).collect();
    let payload = &mut parts[1];
    let last = payload.pop().unwrap();
    payload.push(if last == 'A' { 'B' } else { 'A' });
    std::fs::write(&cache, text.replace(&secret, &parts.join("."))).unwrap();
    let restarted = h.source(&[], clock::system());
    assert!(
        restarted.load_cache().await.is_none(),
        "tampered token refused"
    );
    assert!(!cache.exists(), "and its file removed");
    restarted.get(Duration::ZERO).await.unwrap();
    assert_eq!(h.idp.grants(), 2);
}

#[tokio::test]
async fn a_cache_written_for_another_audience_is_not_used() {
    let h = Harness::start().await;
    h.source(&[], clock::system())
        .get(Duration::ZERO)
        .await
        .unwrap();
    let other = h.source(
        &[("BEHEST_AGENT__AUTH__SCOPE", "read:models")],
        clock::system(),
    );
    assert!(other.load_cache().await.is_none());
}

#[tokio::test]
async fn a_failing_cache_write_still_serves_the_token_from_memory() {
    let h = Harness::start().await;
    let ro = h.path("readonly");
    std::fs::create_dir(&ro).unwrap();
    crate::util::set_mode(&ro, 0o500);
    let cache = ro.join("token.json");
    let source = h.source(
        &[("BEHEST_AGENT__TOKEN__CACHE_FILE", cache.to_str().unwrap())],
        clock::system(),
    );
    // Root ignores directory permissions; the point is that a failed write is not fatal either way.
    source
        .get(Duration::ZERO)
        .await
        .expect("served from memory");
    assert!(source.is_ready());
}

#[tokio::test(start_paused = true)]
async fn a_clock_jumping_forward_a_day_gets_a_new_token_instead_of_serving_an_expired_one() {
    let clock = TestClock::new();
    let h = Harness::start_with(|o| {
        o.token_ttl = Duration::from_secs(3600);
        o.now = devkit_now(clock.clone());
    })
    .await;
    let source = h.source(&[NO_CACHE], clock.clone());
    let (stop, task) = spawn_refresher(&source);
    let first = source.get(Duration::ZERO).await.unwrap();
    clock.jump(Duration::from_secs(24 * 3600));
    assert!(
        source.valid(Duration::ZERO).is_none(),
        "the old token is expired now"
    );
    let second = source.get(Duration::ZERO).await.expect("a new token");
    assert!(!Arc::ptr_eq(&first, &second));
    assert!(second.remaining(clock::Clock::now(clock.as_ref())) > Duration::from_secs(3000));
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn the_cache_lock_file_is_never_opened_through_a_symlink() {
    let h = Harness::start().await;
    std::fs::create_dir_all(h.path("state")).unwrap();
    let elsewhere = h.path("elsewhere");
    std::os::unix::fs::symlink(&elsewhere, h.path("state/token.json.lock")).unwrap();
    let source = h.source(&[], clock::system());
    source
        .get(Duration::ZERO)
        .await
        .expect("the grant goes ahead without the lock");
    assert!(
        !elsewhere.exists(),
        "the lock was opened through the symlink, creating its target"
    );
}

#[tokio::test(start_paused = true)]
async fn a_cached_token_obtained_in_the_future_is_still_refreshed_before_it_expires() {
    let clock = TestClock::new();
    let h = Harness::start_with(|o| {
        o.token_ttl = Duration::from_secs(600);
        o.now = devkit_now(clock.clone());
    })
    .await;
    h.source(&[], clock.clone())
        .get(Duration::ZERO)
        .await
        .unwrap();
    // Written by a machine whose clock was a day ahead.
    let path = h.path("state/token.json");
    let mut entry: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    entry["obtained_at"] = (clock::Clock::unix(clock.as_ref()) + 24 * 3600).into();
    std::fs::write(&path, entry.to_string()).unwrap();
    let source = h.source(&[], clock.clone());
    let loaded = source.load_cache().await.expect("the cached token loads");
    assert!(
        loaded.refresh_at < loaded.expires_at,
        "refresh due after expiry"
    );
    let (stop, task) = spawn_refresher(&source);
    tokio::time::sleep(Duration::from_secs(590)).await;
    assert!(h.idp.grants() >= 2, "refreshed before the token expired");
    assert!(source.is_ready());
    stop.cancel();
    task.await.unwrap();
}

// ---- rationing grants

#[tokio::test(start_paused = true)]
async fn forced_refreshes_within_the_interval_share_one_grant_and_its_outcome() {
    let clock = TestClock::new();
    let h = Harness::start_with(|o| o.now = devkit_now(clock.clone())).await;
    let source = h.source(&[NO_CACHE], clock.clone());
    source.get(Duration::ZERO).await.unwrap();
    let mut tokens = Vec::new();
    for _ in 0..20 {
        tokens.push(source.refresh_now().await.expect("a refreshed token"));
    }
    assert_eq!(h.idp.grants(), 2, "one forced grant for twenty refreshes");
    assert!(tokens.iter().all(|t| Arc::ptr_eq(t, &tokens[0])));
    tokio::time::sleep(MIN_GRANT_INTERVAL).await;
    source.refresh_now().await.unwrap();
    assert_eq!(h.idp.grants(), 3, "after the interval, a new forced grant");
    // A failed forced grant is shared too.
    tokio::time::sleep(MIN_GRANT_INTERVAL).await;
    h.idp.set_fault(Some(Fault::Status(503)));
    let asked = h.idp.token_requests();
    for _ in 0..5 {
        let e = source.refresh_now().await.unwrap_err();
        assert!(e.to_string().contains("503"), "{e}");
    }
    assert_eq!(h.idp.token_requests(), asked + 1);
    assert!(source.is_ready(), "the token held is still served");
}

#[tokio::test(start_paused = true)]
async fn min_ttl_beyond_the_idps_lifetime_makes_one_grant_per_interval_not_one_per_call() {
    let clock = TestClock::new();
    let h = Harness::start_with(|o| {
        o.token_ttl = Duration::from_secs(120);
        o.now = devkit_now(clock.clone());
    })
    .await;
    let source = h.source(&[NO_CACHE], clock.clone());
    source.get(Duration::ZERO).await.unwrap();
    for _ in 0..20 {
        let err = source.get(Duration::from_secs(600)).await.unwrap_err();
        assert!(matches!(err, TokenError::TooShort { .. }), "{err}");
    }
    assert_eq!(h.idp.grants(), 2, "one forced grant for twenty calls");
    let warnings = source.status().warnings;
    assert!(
        warnings.iter().any(|w| w.contains("valid for only 2m")),
        "a lifetime under 5 minutes is warned about: {warnings:?}"
    );
}

#[tokio::test]
async fn a_day_long_token_has_no_lifetime_warning() {
    let h = Harness::start().await;
    let t = h
        .source(&[NO_CACHE], clock::system())
        .get(Duration::ZERO)
        .await
        .unwrap();
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
}

#[tokio::test(start_paused = true)]
async fn one_second_tokens_are_not_replaced_sooner_than_the_interval() {
    let clock = TestClock::new();
    let h = Harness::start_with(|o| {
        o.token_ttl = Duration::from_secs(1);
        o.now = devkit_now(clock.clone());
    })
    .await;
    let source = h.source(&[NO_CACHE], clock.clone());
    source.get(Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let err = source.get(Duration::ZERO).await.unwrap_err();
    assert!(matches!(err, TokenError::ShortLived { .. }), "{err}");
    assert!(err.to_string().contains("token lifetime"), "{err}");
    assert_eq!(h.idp.grants(), 1, "no grant before the interval is over");
    tokio::time::sleep(MIN_GRANT_INTERVAL).await;
    source
        .get(Duration::ZERO)
        .await
        .expect("a new token after it");
    assert_eq!(h.idp.grants(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_refresher_grants_one_second_tokens_at_most_once_per_interval() {
    let clock = TestClock::new();
    let h = Harness::start_with(|o| {
        o.token_ttl = Duration::from_secs(1);
        o.now = devkit_now(clock.clone());
    })
    .await;
    let source = h.source(&[NO_CACHE], clock.clone());
    let (stop, task) = spawn_refresher(&source);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let grants = h.idp.grants();
    assert!(
        (10..=13).contains(&grants),
        "{grants} grants in a minute of 1 s tokens; one per 5 s expected"
    );
    stop.cancel();
    task.await.unwrap();
}

/// A short token lifetime is said once, not at every grant (in `exec`, every grant wrote it to
/// the job's stderr).
#[tokio::test(start_paused = true)]
async fn a_short_lifetime_is_warned_about_once_not_at_every_refresh() {
    let clock = TestClock::new();
    let h = Harness::start_with(|o| {
        o.token_ttl = Duration::from_secs(97);
        o.now = devkit_now(clock.clone());
    })
    .await;
    let source = h.source(
        &[NO_CACHE, ("BEHEST_AGENT__TOKEN__REFRESH_MARGIN", "10s")],
        clock.clone(),
    );
    let (stop, task) = spawn_refresher(&source);
    eventually(Duration::from_secs(600), "three grants", || {
        h.idp.grants() >= 3
    })
    .await;
    let said = crate::util::logs()
        .matches("the IdP issues tokens valid for only 1m 3")
        .count();
    assert_eq!(said, 1);
    stop.cancel();
    task.await.unwrap();
}

/// A cache that could not be written gets the token held once it can: a probe alone cleared the
/// error in `status`, and every restart still cost a grant.
#[tokio::test(start_paused = true)]
async fn a_cache_that_could_not_be_written_gets_the_token_once_it_can() {
    let h = Harness::start().await;
    let cache = h.path("blocked/token.json");
    std::fs::create_dir_all(&cache).unwrap();
    let path = cache.display().to_string();
    let source = h.source(
        &[("BEHEST_AGENT__TOKEN__CACHE_FILE", path.as_str())],
        clock::system(),
    );
    // As the daemon starts: the cache is probed first.
    source.check_cache().await;
    let (stop, task) = spawn_refresher(&source);
    eventually(Duration::from_secs(60), "the grant, unstored", || {
        h.idp.grants() == 1 && source.status().cache_error.is_some()
    })
    .await;
    // Tried again twice: the reason is said once (a write and a probe worded it apart).
    tokio::time::sleep(Duration::from_secs(65)).await;
    let said = crate::util::logs()
        .lines()
        .filter(|l| l.contains(&format!("cannot write the token cache {path}")))
        .count();
    assert_eq!(said, 1);
    std::fs::remove_dir(&cache).unwrap();
    eventually(Duration::from_secs(120), "the token written", || {
        cache.is_file()
    })
    .await;
    assert_eq!(mode_of(&cache), 0o600);
    assert!(source.status().cache_error.is_none());
    // A restart takes it from there: no grant.
    let again = h.source(
        &[("BEHEST_AGENT__TOKEN__CACHE_FILE", path.as_str())],
        clock::system(),
    );
    again.load_cache().await;
    again.get(Duration::ZERO).await.expect("the cached token");
    assert_eq!(h.idp.grants(), 1);
    stop.cancel();
    task.await.unwrap();
}

/// A token cached under one client secret is not served to a configuration with another: a wrong
/// or revoked secret fails at once (it passed for as long as the cached token lived, up to a day).
/// The file holds a mark of the secret, never the secret.
#[tokio::test]
async fn a_cached_token_is_not_served_with_another_secret() {
    let h = Harness::start().await;
    let cache = h.path("cache/token.json");
    let path = cache.display().to_string();
    let with_cache = ("BEHEST_AGENT__TOKEN__CACHE_FILE", path.as_str());
    h.source(&[with_cache], clock::system())
        .get(Duration::ZERO)
        .await
        .expect("a token");
    assert!(!std::fs::read_to_string(&cache).unwrap().contains(&h.secret));
    let wrong = h.path("wrong-secret");
    std::fs::write(&wrong, "wrong-secret-0123456789\n").unwrap();
    crate::util::set_mode(&wrong, 0o600);
    let wrong = wrong.display().to_string();
    let other = h.source(
        &[
            with_cache,
            ("BEHEST_AGENT__AUTH__CLIENT_SECRET_FILE", wrong.as_str()),
        ],
        clock::system(),
    );
    assert!(other.load_cache().await.is_none());
    let err = other.get(Duration::ZERO).await.unwrap_err();
    assert!(err.to_string().contains("invalid_client"), "{err}");
    // The right secret still takes it from the cache: one grant in all.
    h.source(&[with_cache], clock::system())
        .load_cache()
        .await
        .expect("the cached token");
    assert_eq!(h.idp.grants(), 1);
}

/// Why a cache file is not used is said once, not at every read of a start; a directory in its
/// place is named as such (it was "other users may read it").
#[tokio::test]
async fn why_a_cache_file_is_not_used_is_said_once_and_truly() {
    let h = Harness::start().await;
    let cache = h.path("odd/token.json");
    std::fs::create_dir_all(&cache).unwrap();
    let path = cache.display().to_string();
    let source = h.source(
        &[("BEHEST_AGENT__TOKEN__CACHE_FILE", path.as_str())],
        clock::system(),
    );
    for _ in 0..3 {
        assert!(source.load_cache().await.is_none());
    }
    let said: Vec<String> = crate::util::logs()
        .lines()
        .filter(|l| l.contains(&path) && l.contains("not using the token cache"))
        .map(String::from)
        .collect();
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(said[0].contains("not a regular file"), "{said:?}");
}

/// A FIFO planted at the cache path is no token either: opening it waited for a writer forever,
/// and with it `behest-agent token` and the daemon's start.
#[tokio::test]
async fn a_fifo_at_the_cache_path_is_no_token_and_no_hang() {
    let h = Harness::start().await;
    let cache = h.path("token.json");
    nix::unistd::mkfifo(&cache, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let path = cache.display().to_string();
    let source = h.source(
        &[("BEHEST_AGENT__TOKEN__CACHE_FILE", path.as_str())],
        clock::system(),
    );
    let loaded = tokio::time::timeout(Duration::from_secs(30), source.load_cache())
        .await
        .expect("reading a FIFO at the cache path must not wait");
    assert!(loaded.is_none());
    assert!(
        crate::util::logs()
            .lines()
            .any(|l| l.contains(&path) && l.contains("not a regular file")),
        "the FIFO is named as not a regular file"
    );
}

/// A server presenting a CA certificate as its own (`openssl req -x509` makes one by default) is
/// named as such, not as rustls's `Other(OtherError(CaUsedAsEndEntity))` alone.
#[tokio::test]
async fn a_server_presenting_a_ca_certificate_is_named_as_such() {
    use crate::util::{FIXTURES, tls_server_config};
    let config = tls_server_config("ca-as-server-cert.pem", "ca-as-server-key.pem");
    let cert = format!("{FIXTURES}/ca-as-server-cert.pem");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    let http = behest_agent::auth::http::client(
        Duration::from_secs(10),
        Some(cert.as_ref()),
        &behest_agent::egress::Egress::default(),
    )
    .unwrap();
    let err = http.get(&url).send().await.unwrap_err();
    let message = behest_agent::auth::http::describe_reqwest(&err);
    assert!(
        message.contains("presents a CA certificate as its own"),
        "{message}"
    );
}

/// An https issuer's discovery document naming a plain-http token endpoint or JWKS (loopback, so
/// allowed in configuration) is refused: the client secret went to it out of TLS.
#[tokio::test]
async fn an_https_issuer_naming_plain_http_endpoints_is_refused() {
    use crate::util::{FIXTURES, tls_server_config};
    use behest_agent::auth::endpoints;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = tls_server_config("upstream-cert.pem", "upstream-key.pem");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!(
        "https://127.0.0.1:{}/",
        listener.local_addr().unwrap().port()
    );
    let http = behest_agent::auth::http::client(
        Duration::from_secs(10),
        Some(format!("{FIXTURES}/upstream-ca.pem").as_ref()),
        &behest_agent::egress::Egress::default(),
    )
    .unwrap();
    let cases = [
        (
            "token_endpoint",
            "http://127.0.0.1:9/oauth/token",
            "https://127.0.0.1:9/jwks",
        ),
        (
            "jwks_uri",
            "https://127.0.0.1:9/oauth/token",
            "http://127.0.0.1:9/jwks",
        ),
    ];
    for (name, token_endpoint, jwks_uri) in cases {
        let doc = serde_json::json!({
            "issuer": issuer,
            "token_endpoint": token_endpoint,
            "jwks_uri": jwks_uri,
        })
        .to_string();
        let (acceptor, listener) = (acceptor.clone(), &listener);
        let serve = async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let mut buf = vec![0; 4096];
            let _ = tls.read(&mut buf).await.unwrap();
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                doc.len()
            );
            tls.write_all(format!("{head}{doc}").as_bytes())
                .await
                .unwrap();
            tls.shutdown().await.unwrap();
        };
        let configured = config::Endpoints::Discover {
            issuer: issuer.parse().unwrap(),
        };
        let discover = endpoints::resolve(&configured, &http);
        let (resolved, ()) = tokio::join!(discover, serve);
        let err = resolved.expect_err("plain http endpoints of an https issuer");
        let said = err.to_string();
        assert!(said.contains(name) && said.contains("plain http"), "{said}");
    }
}
