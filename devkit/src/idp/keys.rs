//! Keys of the embedded IdP: the RSA keys it signs access tokens with (published as a JWKS), and
//! the client public keys it checks `private_key_jwt` assertions against.
//!
//! Private key material stays inside a jsonwebtoken `EncodingKey` (whose `Debug` is redacted) and
//! is never formatted. The one way out is [`ClientKey::generate_rsa`], which hands the caller a
//! `SecretString` PEM meant for the agent's `private_key_file`.

use std::fmt;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{KeyPair as _, RsaKeyPair, RsaPublicKeyComponents};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

/// Algorithms Auth0 lets a client register for an RSA credential (ES256 for a P-256 one).
const RSA_ASSERTION_ALGS: [Algorithm; 3] = [Algorithm::RS256, Algorithm::RS384, Algorithm::PS256];

/// An RSA-2048 key the IdP signs access tokens with (RS256), and its public half as a JWK.
pub(super) struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

impl SigningKey {
    /// A fresh key with a random `kid`. Costs one RSA key generation (tens of milliseconds).
    pub(super) fn generate() -> Self {
        let kid = random_string(22);
        let (private_pem, n, e) = generate_rsa();
        let encoding = EncodingKey::from_rsa_pem(private_pem.expose_secret().as_bytes())
            .expect("jsonwebtoken accepts the PKCS#8 PEM aws-lc-rs just produced");
        let jwk = json!({
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": kid,
            "n": URL_SAFE_NO_PAD.encode(n),
            "e": URL_SAFE_NO_PAD.encode(e),
        });
        Self { kid, encoding, jwk }
    }

    pub(super) fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWKS entry.
    pub(super) fn jwk(&self) -> &Value {
        &self.jwk
    }

    /// Signs `claims` as an RS256 JWT whose header names `kid`, which is normally [`Self::kid`];
    /// the bad-signature fault passes another key's kid on purpose.
    pub(super) fn sign(&self, kid: &str, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .expect("signing JSON claims with an RSA key we generated cannot fail")
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// A client's registered public key for `private_key_jwt`, and the algorithms its assertions may
/// use (Auth0 registers one algorithm per credential; the defaults allow every one Auth0 offers for
/// the key type).
#[derive(Clone)]
pub struct ClientKey {
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// Why a client public key was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ClientKeyError {
    #[error("expected the client's public key, got a private key: register the public half")]
    PrivateKey,
    #[error("not an RSA or P-256 public key: {0}")]
    Unsupported(jsonwebtoken::errors::Error),
}

impl ClientKey {
    /// A public key in PEM: SPKI `PUBLIC KEY` (RSA or P-256) or PKCS#1 `RSA PUBLIC KEY`. RSA keys
    /// accept RS256, RS384 and PS256 assertions; P-256 keys ES256.
    pub fn from_pem(pem: &str) -> Result<Self, ClientKeyError> {
        // jsonwebtoken would take an RSA *private* key PEM here and then fail every signature
        // check; refuse it up front with a message that says what went wrong.
        if pem.contains("PRIVATE KEY") {
            return Err(ClientKeyError::PrivateKey);
        }
        match DecodingKey::from_rsa_pem(pem.as_bytes()) {
            Ok(key) => Ok(Self::new(key, &RSA_ASSERTION_ALGS)),
            Err(_) => DecodingKey::from_ec_pem(pem.as_bytes())
                .map(|key| Self::new(key, &[Algorithm::ES256]))
                .map_err(ClientKeyError::Unsupported),
        }
    }

    /// A public key as a JWK (RSA or EC P-256). A JWK `alg` narrows the allowed algorithms to it.
    pub fn from_jwk(jwk: &Jwk) -> Result<Self, ClientKeyError> {
        let key = DecodingKey::from_jwk(jwk).map_err(ClientKeyError::Unsupported)?;
        let defaults: &[Algorithm] = match jwk.algorithm {
            AlgorithmParameters::EllipticCurve(_) => &[Algorithm::ES256],
            _ => &RSA_ASSERTION_ALGS,
        };
        let client_key = Self::new(key, defaults);
        Ok(match jwk.common.key_algorithm.map(Algorithm::try_from) {
            Some(Ok(alg)) => client_key.with_algorithms(&[alg]),
            _ => client_key,
        })
    }

    /// Generates an RSA-2048 client credential: the private key as a PKCS#8 PEM (for the agent's
    /// `private_key_file`) and the public key to register with the IdP.
    pub fn generate_rsa() -> (SecretString, Self) {
        let (private_pem, n, e) = generate_rsa();
        let key = DecodingKey::from_rsa_raw_components(&n, &e);
        (private_pem, Self::new(key, &RSA_ASSERTION_ALGS))
    }

    /// Restricts the algorithms assertions may be signed with (as registering one on Auth0 does).
    pub fn with_algorithms(mut self, algorithms: &[Algorithm]) -> Self {
        self.algorithms = algorithms.to_vec();
        self
    }

    pub fn algorithms(&self) -> &[Algorithm] {
        &self.algorithms
    }

    pub(super) fn decoding_key(&self) -> &DecodingKey {
        &self.key
    }

    fn new(key: DecodingKey, algorithms: &[Algorithm]) -> Self {
        Self {
            key,
            algorithms: algorithms.to_vec(),
        }
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientKey")
            .field("family", &self.key.family())
            .field("algorithms", &self.algorithms)
            .finish()
    }
}

/// A fresh RSA-2048 key: its private half as a PKCS#8 PEM, and its public modulus and exponent
/// (big-endian, no leading zeros, as a JWK wants them).
///
/// aws-lc-rs exports a generated private key only as PKCS#8 DER, while jsonwebtoken's aws-lc
/// backend signs with `RsaKeyPair::from_der`, which takes PKCS#1 `RSAPrivateKey` — so
/// `EncodingKey::from_rsa_der(pkcs8)` fails at signing time. `EncodingKey::from_rsa_pem` unwraps a
/// PKCS#8 `PRIVATE KEY` PEM to the PKCS#1 it holds, so the key travels as a PEM.
fn generate_rsa() -> (SecretString, Vec<u8>, Vec<u8>) {
    let pair = RsaKeyPair::generate(KeySize::Rsa2048)
        .expect("aws-lc-rs could not generate an RSA-2048 key");
    let pkcs8 = pair
        .as_der()
        .expect("aws-lc-rs could not serialise its own RSA key as PKCS#8");
    let private_pem = SecretString::from(pem_encode("PRIVATE KEY", pkcs8.as_ref()));
    let public = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public_key());
    (private_pem, public.n, public.e)
}

/// PEM armour (RFC 7468): base64 in 64-column lines between BEGIN/END markers.
pub(super) fn pem_encode(label: &str, der: &[u8]) -> String {
    // The DER is a private key: wipe the intermediate copy too.
    let base64 = Zeroizing::new(STANDARD.encode(der));
    let mut pem = format!("-----BEGIN {label}-----\n");
    for (i, c) in base64.chars().enumerate() {
        if i > 0 && i % 64 == 0 {
            pem.push('\n');
        }
        pem.push(c);
    }
    pem.push_str(&format!("\n-----END {label}-----\n"));
    pem
}

/// A random alphanumeric string, for key ids and opaque tokens (neither needs to be unguessable).
pub(super) fn random_string(len: usize) -> String {
    std::iter::repeat_with(fastrand::alphanumeric)
        .take(len)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    use jsonwebtoken::Validation;

    fn rsa_public_pem() -> String {
        let pair = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
        pem_encode("PUBLIC KEY", pair.public_key().as_der().unwrap().as_ref())
    }

    fn p256_public_pem() -> String {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        pem_encode("PUBLIC KEY", pair.public_key().as_der().unwrap().as_ref())
    }

    #[test]
    fn from_pem_takes_an_rsa_key_for_auth0_rsa_algorithms_and_a_p256_key_for_es256() {
        let rsa = ClientKey::from_pem(&rsa_public_pem()).unwrap();
        assert_eq!(rsa.algorithms(), RSA_ASSERTION_ALGS);

        let p256 = ClientKey::from_pem(&p256_public_pem()).unwrap();
        assert_eq!(p256.algorithms(), [Algorithm::ES256]);
    }

    #[test]
    fn from_pem_refuses_a_private_key_and_garbage() {
        let (private_pem, _) = ClientKey::generate_rsa();
        assert!(matches!(
            ClientKey::from_pem(private_pem.expose_secret()),
            Err(ClientKeyError::PrivateKey)
        ));
        assert!(matches!(
            ClientKey::from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"),
            Err(ClientKeyError::Unsupported(_))
        ));
    }

    #[test]
    fn from_jwk_narrows_the_algorithms_to_the_jwk_alg() {
        let signing = SigningKey::generate();
        let mut jwk: Jwk = serde_json::from_value(signing.jwk().clone()).unwrap();
        assert_eq!(
            ClientKey::from_jwk(&jwk).unwrap().algorithms(),
            [Algorithm::RS256]
        );

        jwk.common.key_algorithm = None;
        assert_eq!(
            ClientKey::from_jwk(&jwk).unwrap().algorithms(),
            RSA_ASSERTION_ALGS
        );
    }

    #[test]
    fn a_signed_token_verifies_with_the_published_jwk() {
        let signing = SigningKey::generate();
        let token = signing.sign(signing.kid(), &json!({ "exp": u64::MAX / 2 }));

        let jwk: Jwk = serde_json::from_value(signing.jwk().clone()).unwrap();
        let key = DecodingKey::from_jwk(&jwk).unwrap();
        jsonwebtoken::decode::<Value>(&token, &key, &Validation::new(Algorithm::RS256)).unwrap();
        assert_eq!(jwk.common.key_id.as_deref(), Some(signing.kid()));
        // A JWK modulus has no sign byte: 2048 bits are exactly 256 bytes.
        let n = URL_SAFE_NO_PAD
            .decode(signing.jwk()["n"].as_str().unwrap())
            .unwrap();
        assert_eq!(n.len(), 256);
    }

    #[test]
    fn debug_output_shows_no_key_material() {
        let signing = SigningKey::generate();
        let (private_pem, client_key) = ClientKey::generate_rsa();
        let printed = format!("{signing:?} {client_key:?} {private_pem:?}");

        assert!(printed.contains(signing.kid()));
        for secret_line in private_pem.expose_secret().lines().skip(1).take(3) {
            assert!(!printed.contains(secret_line));
        }
        assert!(!printed.contains(signing.jwk()["n"].as_str().unwrap()));
    }
}
