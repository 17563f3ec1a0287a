//! The sealed entry: what Redis holds for a shared token. AES-256-GCM under a key derived with
//! HKDF-SHA256 from the client credential (the secret, or the private key) and the cache key, so
//! only an agent holding the same credential for the same token can read it; the entry's key name
//! is the associated data, so a blob copied to another name does not open either. Nothing here
//! logs; a failure says only what kind of failure it was.
//!
//! Layout: `0x01` (the version) ‖ a random 96-bit nonce ‖ the ciphertext and its 128-bit tag. The
//! plaintext is `{"access_token": …, "obtained_at": UNIX_SECONDS, "verified_with": JWK | null}`:
//! the key that verified the token, as the disk cache keeps it, so an agent that reads the entry
//! checks the token without the network (an agent holding the credential wrote it).

use std::time::SystemTime;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hkdf::{HKDF_SHA256, Salt};
use jsonwebtoken::jwk::Jwk;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// The format's version byte.
const VERSION: u8 = 1;
/// HKDF's salt: names the purpose, so this key can never equal one derived for anything else.
const SALT: &[u8] = b"behest-agent fleet entry v1";
const TAG_LEN: usize = 16;
/// The largest entry accepted: a JWT of a few KiB and its envelope fit many times over.
pub const MAX_ENTRY: usize = 64 * 1024;

/// A key that seals and opens one token's entries.
pub struct SealKey(LessSafeKey);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

/// A token as the entry carries it, not yet checked.
pub struct Entry {
    pub access_token: SecretString,
    pub obtained_at: SystemTime,
    /// The key that verified the token when it was shared (none when signatures are not checked).
    pub verified_with: Option<Jwk>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("obtained_at", &self.obtained_at)
            .finish_non_exhaustive()
    }
}

/// Why an entry could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Not an entry of this format at all (too short, too long, another version).
    #[error("the value is not a sealed token entry")]
    Garbage,
    /// The tag does not verify: sealed under another credential (a rotated secret) or altered.
    #[error(
        "the entry does not open with this client's credential (sealed under another one, or altered)"
    )]
    Unreadable,
}

#[derive(Serialize)]
struct Sealing<'a> {
    access_token: &'a str,
    obtained_at: u64,
    verified_with: Option<&'a Jwk>,
}

#[derive(Deserialize)]
struct Opened {
    access_token: String,
    obtained_at: u64,
    verified_with: Option<Jwk>,
}

impl SealKey {
    /// The key for the token named by `cache_key` (its canonical JSON), derived from `credential`.
    pub fn derive(credential: &[u8], cache_key: &[u8]) -> SealKey {
        let prk = Salt::new(HKDF_SHA256, SALT).extract(credential);
        let info = [cache_key];
        let okm = prk
            .expand(&info, &AES_256_GCM)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        SealKey(LessSafeKey::new(UnboundKey::from(okm)))
    }

    /// Seals `token` for the entry named `name`.
    pub fn seal(
        &self,
        name: &str,
        token: &SecretString,
        obtained_at: SystemTime,
        verified_with: Option<&Jwk>,
    ) -> Vec<u8> {
        let plain = Sealing {
            access_token: token.expose_secret(),
            obtained_at: obtained_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            verified_with,
        };
        let mut body =
            Zeroizing::new(serde_json::to_vec(&plain).expect("a string and a number serialize"));
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).expect("the system RNG works");
        let tag = self
            .0
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                body.as_mut_slice(),
            )
            .expect("AES-GCM seals any message of this size");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + body.len() + TAG_LEN);
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// Opens the entry named `name`.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Entry, OpenError> {
        if sealed.len() < 1 + NONCE_LEN + TAG_LEN || sealed.len() > MAX_ENTRY {
            return Err(OpenError::Garbage);
        }
        if sealed[0] != VERSION {
            return Err(OpenError::Garbage);
        }
        let nonce = Nonce::try_assume_unique_for_key(&sealed[1..1 + NONCE_LEN])
            .map_err(|_| OpenError::Garbage)?;
        let mut body = Zeroizing::new(sealed[1 + NONCE_LEN..].to_vec());
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(name.as_bytes()), body.as_mut_slice())
            .map_err(|_| OpenError::Unreadable)?;
        // Authentic, so written by an agent with this credential: a body that does not parse is
        // an agent's bug, not an attack, and is still refused.
        let plain: Opened = serde_json::from_slice(plain).map_err(|_| OpenError::Garbage)?;
        Ok(Entry {
            obtained_at: crate::clock::from_unix(plain.obtained_at).ok_or(OpenError::Garbage)?,
            access_token: SecretString::from(plain.access_token),
            verified_with: plain.verified_with,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const NAME: &str = "behest-agent:token:abc";

    fn key(credential: &str) -> SealKey {
        SealKey::derive(credential.as_bytes(), br#"{"client_id":"c"}"#)
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn an_entry_opens_with_the_same_credential_and_name() {
        let token = SecretString::from("eyJ.token.sig".to_string());
        let jwk: Jwk = serde_json::from_value(serde_json::json!({
            "kty": "RSA", "kid": "k1", "alg": "RS256", "n": "sXch", "e": "AQAB"
        }))
        .unwrap();
        let sealed = key("secret-1").seal(NAME, &token, at(1_700_000_000), Some(&jwk));
        let entry = key("secret-1").open(NAME, &sealed).expect("it opens");
        assert_eq!(entry.access_token.expose_secret(), "eyJ.token.sig");
        assert_eq!(entry.obtained_at, at(1_700_000_000));
        assert_eq!(entry.verified_with, Some(jwk));
    }

    #[test]
    fn the_token_is_not_in_the_sealed_bytes_and_each_seal_differs() {
        let token = SecretString::from("eyJhbGciOiJSUzI1NiJ9.payload.signature".to_string());
        let a = key("s").seal(NAME, &token, at(1), None);
        let b = key("s").seal(NAME, &token, at(1), None);
        assert_ne!(a, b, "a fresh nonce every time");
        let text = String::from_utf8_lossy(&a);
        assert!(!text.contains("eyJ") && !text.contains("payload"));
    }

    #[test]
    fn a_rotated_secret_another_cache_key_or_another_name_cannot_open_it() {
        let token = SecretString::from("tok".to_string());
        let sealed = key("old-secret").seal(NAME, &token, at(1), None);
        assert_eq!(
            key("new-secret").open(NAME, &sealed).unwrap_err(),
            OpenError::Unreadable
        );
        let other_key = SealKey::derive(b"old-secret", br#"{"client_id":"d"}"#);
        assert_eq!(
            other_key.open(NAME, &sealed).unwrap_err(),
            OpenError::Unreadable
        );
        assert_eq!(
            key("old-secret")
                .open("behest-agent:token:other", &sealed)
                .unwrap_err(),
            OpenError::Unreadable
        );
    }

    #[test]
    fn every_altered_byte_is_refused() {
        let token = SecretString::from("tok".to_string());
        let k = key("s");
        let sealed = k.seal(NAME, &token, at(1), None);
        for i in 0..sealed.len() {
            let mut altered = sealed.clone();
            altered[i] ^= 0x01;
            assert!(
                k.open(NAME, &altered).is_err(),
                "byte {i} altered and accepted"
            );
        }
    }

    #[test]
    fn values_that_are_not_entries_are_garbage() {
        let k = key("s");
        for v in [
            &b""[..],
            b"hello",
            &[2u8; 64][..],
            &vec![1u8; MAX_ENTRY + 1][..],
        ] {
            assert_eq!(k.open(NAME, v).unwrap_err(), OpenError::Garbage);
        }
    }
}
