//! devkit's echo upstream over real sockets, served by the agent's `server::serve`: what devkit's
//! own tests, which call its services in memory, cannot reach.

use devkit::upstream::{Keys, Upstream, UpstreamOptions};
use serde_json::json;

use crate::proxy::http;
use crate::util::{AUDIENCE, Harness, Start};

#[tokio::test]
async fn upstream_fetches_the_jwks_over_http_once_and_again_after_a_key_rotation() {
    let h = Harness::start().await;
    let (upstream, _stop) = Upstream::start(UpstreamOptions {
        keys: Some(Keys::Jwks(h.idp.jwks_uri().parse().unwrap())),
        issuer: Some(h.idp.issuer()),
        ..UpstreamOptions::new(AUDIENCE)
    })
    .await
    .unwrap();
    let models = format!("{}/v1/models", upstream.base_url());
    let status = |token: String| {
        let request = http().get(&models).bearer_auth(token).send();
        async move { request.await.unwrap().status().as_u16() }
    };

    let first = h.idp.mint(json!({}));
    assert_eq!(status(first.clone()).await, 200);
    assert_eq!(status(h.idp.mint(json!({}))).await, 200);
    assert_eq!(h.idp.jwks_requests(), 1, "the JWKS is fetched once");

    h.idp.rotate_key(false);
    assert_eq!(status(h.idp.mint(json!({}))).await, 200, "the new key");
    assert_eq!(h.idp.jwks_requests(), 2, "fetched again for the new kid");
    assert_eq!(
        status(first).await,
        401,
        "the dropped key no longer verifies"
    );
    assert_eq!(
        status(h.idp.mint(json!({"aud": "https://elsewhere.test"}))).await,
        401
    );
    let claims = upstream.requests()[0].claims.clone().expect("verified");
    assert_eq!(claims["uid"], h.client_id.as_str());
}
