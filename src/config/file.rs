//! The configuration file model: what a user writes in TOML (or sets as `BEHEST_AGENT__SECTION__KEY`),
//! deserialized as is. No validation happens here beyond types; unknown keys are refused by serde so
//! a typo never silently falls back to a default. [`super::settings`] turns this into settings.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub auth: AuthFile,
    pub token: TokenFile,
    pub proxy: ProxyFile,
    pub control: ControlFile,
    pub telemetry: TelemetryFile,
    pub usage: UsageFile,
    pub budget: BudgetFile,
    pub egress: EgressFile,
    pub fleet: FleetFile,
    /// `[profiles.NAME]`: other identities on the same agent (SPEC §9).
    pub profiles: BTreeMap<String, ProfileFile>,
}

/// `[profiles.NAME]`: any `[auth]` key, and `upstream`; what it leaves out comes from `[auth]` and
/// `[proxy]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileFile {
    pub provider: Option<String>,
    pub domain: Option<String>,
    pub issuer: Option<String>,
    pub token_url: Option<String>,
    pub jwks_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret_file: Option<String>,
    pub client_auth: Option<String>,
    pub private_key_file: Option<String>,
    pub signing_alg: Option<String>,
    pub key_id: Option<String>,
    pub audience: Option<String>,
    pub resource: Option<String>,
    pub scope: Option<String>,
    pub organization: Option<String>,
    pub extra_params: Option<BTreeMap<String, String>>,
    #[serde(deserialize_with = "duration")]
    pub timeout: Option<Duration>,
    pub upstream: Option<String>,
}

impl ProfileFile {
    /// The profile's `[auth]`: its own keys, else `[auth]`'s.
    pub fn over(self, a: &AuthFile) -> AuthFile {
        AuthFile {
            provider: self.provider.or_else(|| a.provider.clone()),
            domain: self.domain.or_else(|| a.domain.clone()),
            issuer: self.issuer.or_else(|| a.issuer.clone()),
            token_url: self.token_url.or_else(|| a.token_url.clone()),
            jwks_url: self.jwks_url.or_else(|| a.jwks_url.clone()),
            client_id: self.client_id.or_else(|| a.client_id.clone()),
            client_secret_file: self
                .client_secret_file
                .or_else(|| a.client_secret_file.clone()),
            client_auth: self.client_auth.or_else(|| a.client_auth.clone()),
            private_key_file: self.private_key_file.or_else(|| a.private_key_file.clone()),
            signing_alg: self.signing_alg.or_else(|| a.signing_alg.clone()),
            key_id: self.key_id.or_else(|| a.key_id.clone()),
            audience: self.audience.or_else(|| a.audience.clone()),
            resource: self.resource.or_else(|| a.resource.clone()),
            scope: self.scope.or_else(|| a.scope.clone()),
            organization: self.organization.or_else(|| a.organization.clone()),
            extra_params: self.extra_params.unwrap_or_else(|| a.extra_params.clone()),
            timeout: self.timeout.or(a.timeout),
        }
    }
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthFile {
    pub provider: Option<String>,
    pub domain: Option<String>,
    pub issuer: Option<String>,
    pub token_url: Option<String>,
    pub jwks_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret_file: Option<String>,
    pub client_auth: Option<String>,
    pub private_key_file: Option<String>,
    pub signing_alg: Option<String>,
    pub key_id: Option<String>,
    pub audience: Option<String>,
    pub resource: Option<String>,
    pub scope: Option<String>,
    pub organization: Option<String>,
    pub extra_params: BTreeMap<String, String>,
    #[serde(deserialize_with = "duration")]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenFile {
    pub uid_claim: Option<String>,
    pub expected_uid: Option<String>,
    pub uid_check: Option<String>,
    pub required_claims: Option<OneOrMany>,
    pub verify_signature: Option<bool>,
    #[serde(deserialize_with = "duration")]
    pub refresh_margin: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub min_backoff: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub max_backoff: Option<Duration>,
    pub cache_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyFile {
    pub listen: Option<OneOrMany>,
    pub upstream: Option<String>,
    pub allow_insecure_upstream: Option<bool>,
    pub ca_file: Option<String>,
    pub session_id: Option<String>,
    pub session_from_ci: Option<bool>,
    pub allow_remote: Option<bool>,
    pub allowed_origins: Option<OneOrMany>,
    pub require_key: Option<bool>,
    pub keys_file: Option<String>,
    pub allowed_hosts: Option<OneOrMany>,
    #[serde(deserialize_with = "whole")]
    pub max_connections: Option<usize>,
    #[serde(deserialize_with = "whole")]
    pub max_upstream_connections: Option<usize>,
    pub max_replay_body: Option<String>,
    pub replay_budget: Option<String>,
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub header_read_timeout: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub upstream_timeout: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlFile {
    pub socket: Option<String>,
    pub socket_mode: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryFile {
    pub log_format: Option<String>,
    pub log_level: Option<String>,
    pub metrics_listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageFile {
    pub ledger_file: Option<String>,
    pub ledger_max_size: Option<String>,
    pub stream_include_usage: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressFile {
    pub proxy: Option<String>,
    pub no_proxy: Option<String>,
    pub proxy_password_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetFile {
    #[serde(deserialize_with = "whole")]
    pub session_tokens: Option<u64>,
    #[serde(deserialize_with = "whole")]
    pub session_requests: Option<u64>,
    #[serde(deserialize_with = "whole")]
    pub hourly_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetFile {
    pub redis_url: Option<String>,
    pub redis_username: Option<String>,
    pub redis_password_file: Option<String>,
    pub ca_file: Option<String>,
    pub key_prefix: Option<String>,
    #[serde(deserialize_with = "duration")]
    pub lock_timeout: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub timeout: Option<Duration>,
}

/// A list key: `listen = ["127.0.0.1:8711", "unix:/run/x.sock"]`, or one string of
/// comma-separated items (`--set`, and the environment before the `config` crate splits it) or
/// a JSON list; items are trimmed, empty ones dropped.
#[derive(Debug, Clone)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// By hand rather than `untagged`, whose error names no type the user wrote.
impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Items;
        impl<'de> Visitor<'de> for Items {
            type Value = OneOrMany;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of strings, such as [\"127.0.0.1:8711\"]")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                json_list(v)?;
                Ok(OneOrMany::One(v.to_string()))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    items.push(item);
                }
                json_list(&items.join(","))?;
                Ok(OneOrMany::Many(items))
            }
        }
        d.deserialize_any(Items)
    }
}

/// Text that looks like a JSON list (`["…`, or `[…]` around anything but an IPv6 address) must be
/// one of strings: `["tid",1]` or `[tid, pid]` is refused rather than read as the items `["tid"`
/// and `1]`.
fn json_list<E: de::Error>(text: &str) -> Result<(), E> {
    let Some(rest) = text.trim().strip_prefix('[') else {
        return Ok(());
    };
    let opens = rest.trim_start().starts_with('"')
        || rest
            .strip_suffix(']')
            .is_some_and(|inner| inner.parse::<std::net::Ipv6Addr>().is_err());
    match serde_json::from_str::<Vec<String>>(text) {
        Err(e) if opens => Err(E::custom(format!(
            "`{text}` is not a JSON list of strings ({e}); write [\"a\", \"b\"], or a,b"
        ))),
        _ => Ok(()),
    }
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        // A JSON list (`--set 'key=["a","b"]'`, or from the environment, which the `config`
        // crate splits at its commas); anything else that starts with `[` is an IPv6 address.
        let json = |s: &str| serde_json::from_str::<Vec<String>>(s).ok();
        let items = match self {
            OneOrMany::One(s) => {
                json(&s).unwrap_or_else(|| s.split(',').map(String::from).collect())
            }
            OneOrMany::Many(v) => json(&v.join(",")).unwrap_or(v),
        };
        items
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }
}

/// A count: a whole, non-negative number. The `config` crate would round `1.5` silently.
fn whole<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    struct Whole<T>(std::marker::PhantomData<T>);
    impl<T: TryFrom<u64>> Visitor<'_> for Whole<T> {
        type Value = Option<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a whole number such as 100000")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            T::try_from(v)
                .map(Some)
                .map_err(|_| E::custom(format!("{v} is too large")))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            match u64::try_from(v) {
                Ok(v) => self.visit_u64(v),
                Err(_) => Err(E::custom(format!(
                    "{v} is negative; write a whole number (0 or more)"
                ))),
            }
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Err(E::custom(format!(
                "{v} is not a whole number; write one such as {}",
                v.trunc().max(0.0)
            )))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            match v.trim().parse::<u64>() {
                Ok(n) => self.visit_u64(n),
                Err(_) => Err(E::custom(format!(
                    "\"{v}\" is not a whole number; write one such as 100000"
                ))),
            }
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(Whole(std::marker::PhantomData))
}

/// A duration as written in the configuration: "30s", "5m", "1h 30m". A bare number is refused
/// with the fix (TOML gives `300` as a number; an environment variable's "300" is read as one too),
/// since seconds cannot be assumed.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    struct Text;
    impl Visitor<'_> for Text {
        type Value = Option<Duration>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a duration such as \"30s\" or \"5m\"")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            humantime::parse_duration(v.trim()).map(Some).map_err(|e| {
                E::custom(format!(
                    "\"{v}\" is not a duration ({e}); write it like \"30s\", \"5m\" or \"1h\""
                ))
            })
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Err(E::custom(format!(
                "{v} is a number without a unit; write it like \"{v}s\" (seconds) or \"{v}ms\""
            )))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            self.visit_i64(v.min(i64::MAX as u64) as i64)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Err(E::custom(format!(
                "{v} is a number without a unit; write it like \"{v}s\" or \"1500ms\""
            )))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(Text)
}
