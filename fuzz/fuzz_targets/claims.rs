//! Token checks: any token string through `Verifier::check` with signature verification off
//! (`token.verify_signature = false`). Must never panic; whatever it accepts has not expired and
//! meets the configured audience and uid.
//!
//! The first byte picks the configuration (uid check enforce/warn, issuer and audience expected
//! or not) and the input mode: the rest is the token as is, or (bit 3) up to three NUL-separated
//! parts that are base64url-encoded and joined with `.`, so the fuzzer edits the header and claims
//! JSON directly instead of having to find its way through base64.

#![no_main]

use behest_agent::auth::ResolvedEndpoints;
use behest_agent::clock::{self, Clock};
use behest_agent::config::UidCheck;
use libfuzzer_sys::fuzz_target;
use secrecy::SecretString;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, token)) = data.split_first() else {
        return;
    };
    let token = if flags & 8 != 0 {
        use base64::Engine;
        token
            .splitn(3, |&b| b == 0)
            .map(|part| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(part))
            .collect::<Vec<_>>()
            .join(".")
    } else {
        String::from_utf8_lossy(token).into_owned()
    };
    let uid_check = if flags & 1 != 0 {
        UidCheck::Warn
    } else {
        UidCheck::Enforce
    };
    let audience = flags & 2 != 0;
    let issuer = (flags & 4 != 0).then(|| "https://idp.example/".to_string());
    let verifier = behest_agent_fuzz::verifier(uid_check, audience);
    let endpoints = ResolvedEndpoints {
        issuer,
        token_url: url::Url::parse("https://idp.example/oauth/token").unwrap(),
        jwks_url: None,
    };
    let now = clock::SystemClock.unix();
    let secret = SecretString::from(token);
    let result = behest_agent_fuzz::runtime().block_on(verifier.check(&secret, &endpoints));
    if let Ok((claims, _)) = result {
        assert!(claims.exp > now, "an expired token was accepted");
        if audience {
            assert!(
                claims
                    .audiences()
                    .iter()
                    .any(|a| a == behest_agent_fuzz::AUDIENCE)
            );
        }
        if uid_check == UidCheck::Enforce {
            assert_eq!(claims.uid.as_deref(), Some(behest_agent_fuzz::CLIENT_ID));
        }
    }
});
