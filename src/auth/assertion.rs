//! RFC 7523 client assertions for `private_key_jwt`: a new signed JWT for every token request, with
//! `iss` = `sub` = the client id, `aud` = the issuer (Auth0 wants `https://DOMAIN/` with the slash), a
//! unique `jti` and a one-minute `exp`. The assertion is a secret: it is never logged.

use std::time::Duration;

use jsonwebtoken::{Header, encode};
use secrecy::SecretString;
use serde::Serialize;

use crate::config::AssertionKey;

/// How long an assertion is valid (Auth0 accepts at most 5 minutes).
const LIFETIME: Duration = Duration::from_secs(60);

#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
    jti: String,
}

/// Signs a fresh assertion.
pub fn sign(
    key: &AssertionKey,
    client_id: &str,
    audience: &str,
    now_unix: u64,
) -> Result<SecretString, String> {
    let mut header = Header::new(key.alg);
    header.kid = key.key_id.clone();
    header.typ = Some("JWT".to_string());
    let claims = AssertionClaims {
        iss: client_id,
        sub: client_id,
        aud: audience,
        iat: now_unix,
        nbf: now_unix,
        exp: now_unix + LIFETIME.as_secs(),
        jti: jti(),
    };
    encode(&header, &claims, &key.key)
        .map(SecretString::from)
        .map_err(|e| format!("{e} (is {} a {:?} key?)", key.path.display(), key.alg))
}

/// 128 random bits, hex.
fn jti() -> String {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system RNG works");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
