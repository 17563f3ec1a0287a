//! Against a real OAuth2 server: the npm package `oidc-provider`, started on loopback by the test,
//! with client-credentials clients whose JWT access tokens carry `uid` (its `extraTokenClaims`) for
//! the resource the agent asks for (it understands `resource`, not Auth0's `audience`).

use std::collections::HashMap;
use std::time::Duration;

use behest_agent::clock;
use behest_agent::config::{self, LoadOptions};
use behest_agent::token::TokenSource;
use secrecy::ExposeSecret;
use serde_json::json;

use crate::node::OidcProvider;
use crate::util::{capture_logs, random, rsa_client_key};

const RESOURCE: &str = "https://behest.test/api";

struct Interop {
    op: OidcProvider,
    dir: tempfile::TempDir,
    secret: String,
    key_pem: String,
}

async fn start(extra_clients: Vec<serde_json::Value>) -> Interop {
    capture_logs();
    let secret = format!("op-{}", random(30));
    let (key_pem, jwk) = rsa_client_key();
    let mut clients = vec![
        json!({"client_id": "ci-post", "client_secret": secret, "auth": "client_secret_post"}),
        json!({"client_id": "ci-basic", "client_secret": secret, "auth": "client_secret_basic"}),
        json!({"client_id": "ci-pkjwt", "auth": "private_key_jwt", "jwks": {"keys": [jwk]}, "alg": "RS256"}),
    ];
    clients.extend(extra_clients);
    let op = OidcProvider::start(json!({
        "audience": RESOURCE, "ttl": 300, "tid": "tenant-1", "pid": "project-1", "tier": "pro",
        "clients": clients,
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), &secret).unwrap();
    std::fs::write(dir.path().join("key.pem"), &key_pem).unwrap();
    Interop {
        op,
        dir,
        secret,
        key_pem,
    }
}

impl Interop {
    fn source(&self, client_id: &str, auth: &str) -> TokenSource {
        let mut env: HashMap<String, String> = HashMap::new();
        let mut set = |k: &str, v: &str| env.insert(k.to_string(), v.to_string());
        set("BEHEST_AGENT__AUTH__PROVIDER", "oidc");
        set("BEHEST_AGENT__AUTH__ISSUER", &self.op.issuer);
        set("BEHEST_AGENT__AUTH__CLIENT_ID", client_id);
        set("BEHEST_AGENT__AUTH__CLIENT_AUTH", auth);
        set("BEHEST_AGENT__AUTH__RESOURCE", RESOURCE);
        set("BEHEST_AGENT__TOKEN__CACHE_FILE", "");
        if auth == "private_key_jwt" {
            set(
                "BEHEST_AGENT__AUTH__PRIVATE_KEY_FILE",
                self.dir.path().join("key.pem").to_str().unwrap(),
            );
        } else {
            set(
                "BEHEST_AGENT__AUTH__CLIENT_SECRET_FILE",
                self.dir.path().join("secret").to_str().unwrap(),
            );
        }
        let settings = config::load(&LoadOptions {
            path: None,
            default_path: None,
            env,
            overrides: vec![],
        })
        .expect("settings");
        TokenSource::new(&settings, clock::system()).unwrap()
    }

    fn assert_no_secrets_logged(&self, tokens: &[String]) {
        let mut secrets = vec![
            self.secret.clone(),
            self.key_pem.lines().nth(5).unwrap().to_string(),
        ];
        secrets.extend(tokens.iter().cloned());
        crate::util::assert_no_secret_in(&crate::util::logs(), &secrets, "the agent's logs");
    }
}

async fn grant_with(method: &str, client_id: &str) {
    let mut i = start(vec![]).await;
    let source = i.source(client_id, method);
    let t = match source.get(Duration::ZERO).await {
        Ok(t) => t,
        Err(e) => panic!(
            "{method} against oidc-provider failed: {e}\n--- oidc-provider ---\n{}",
            i.op.stderr()
        ),
    };
    let view = t.claims.view();
    assert_eq!(view.uid.as_deref(), Some(client_id));
    assert_eq!(view.tid.as_deref(), Some("tenant-1"));
    assert_eq!(view.pid.as_deref(), Some("project-1"));
    assert_eq!(view.aud, vec![RESOURCE.to_string()]);
    assert_eq!(view.iss.as_deref(), Some(i.op.issuer.as_str()));
    i.assert_no_secrets_logged(&[t.secret().expose_secret().to_string()]);
}

#[tokio::test]
async fn oidc_provider_issues_a_checked_token_with_client_secret_post() {
    grant_with("client_secret_post", "ci-post").await;
}

#[tokio::test]
async fn oidc_provider_issues_a_checked_token_with_client_secret_basic() {
    grant_with("client_secret_basic", "ci-basic").await;
}

#[tokio::test]
async fn oidc_provider_issues_a_checked_token_with_private_key_jwt() {
    grant_with("private_key_jwt", "ci-pkjwt").await;
}

#[tokio::test]
async fn oidc_provider_token_without_uid_is_refused() {
    let i = start(vec![json!({"client_id": "ci-nouid", "client_secret": "unused", "auth": "client_secret_post", "uid": null})]).await;
    // This client's secret differs from the shared file: give it its own.
    std::fs::write(i.dir.path().join("secret"), "unused").unwrap();
    let source = i.source("ci-nouid", "client_secret_post");
    let err = source.get(Duration::ZERO).await.unwrap_err().to_string();
    assert!(
        err.contains("no `uid` claim") && err.contains("onExecuteCredentialsExchange"),
        "{err}"
    );
}

#[tokio::test]
async fn oidc_provider_wrong_secret_is_invalid_client() {
    let i = start(vec![]).await;
    std::fs::write(i.dir.path().join("secret"), "not-the-secret").unwrap();
    let source = i.source("ci-post", "client_secret_post");
    let err = source.refresh_now().await.unwrap_err();
    assert_eq!(err.code(), "invalid_client", "{err}");
    assert!(err.is_config_error());
}
