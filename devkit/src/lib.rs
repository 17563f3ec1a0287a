//! devkit: in-process stand-ins for the services behest-agent talks to. They are the servers of
//! `behest-agent dev` and the test support of `tests/`, `fuzz/` and the benchmark — not production
//! code: no TLS, loopback only, keys in memory, faults to inject. The product crate depends on this
//! one (for `dev`); this crate never depends on the product, so nothing here can share a bug with
//! what it tests.
//!
//! # Layout
//!
//! - [`idp`]: an Auth0-compatible OAuth2 server (client-credentials grant with the three client
//!   authentication methods, RS256 JWTs, JWKS, discovery) with switchable faults. `idp/keys` owns
//!   its signing keys and the client keys it checks assertions with; `idp/client_auth` owns
//!   Auth0's client authentication rules.
//! - [`upstream`]: the OpenAI-compatible echo upstream. It checks bearer tokens as Behest does
//!   (`upstream/verify`, with plain `jsonwebtoken`, not the agent's verifier), streams SSE, takes
//!   uploads, records what it received, and takes faults.
//! - [`Now`]: where both read the wall-clock time, so a test can share its clock with them.
//!
//! Neither has an accept loop. Each is a hyper service ([`idp::Idp::service`],
//! [`upstream::Upstream::service`]) built with the address it will be reached at; whoever binds
//! the listener serves it (`behest_agent::server::serve` in `dev`, the tests and the fuzzers), or
//! calls it directly with a request, as this crate's own tests do.
//!
//! Nothing here may log or format a secret, because the agent's tests check that *it* does not.

#![forbid(unsafe_code)]

pub mod idp;
pub mod upstream;

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of wall-clock time: the system clock unless a test hands in its own.
#[derive(Clone)]
pub struct Now(Arc<dyn Fn() -> SystemTime + Send + Sync>);

impl Now {
    /// The system clock.
    pub fn system() -> Now {
        Now(Arc::new(SystemTime::now))
    }

    /// The time `f` says, e.g. a test clock shared with the agent under test.
    pub fn from_fn(f: impl Fn() -> SystemTime + Send + Sync + 'static) -> Now {
        Now(Arc::new(f))
    }

    pub fn time(&self) -> SystemTime {
        (self.0)()
    }

    /// Seconds since the Unix epoch (what JWT `iat` and `exp` use).
    pub fn unix(&self) -> u64 {
        self.time()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    }
}

impl Default for Now {
    fn default() -> Now {
        Now::system()
    }
}

impl fmt::Debug for Now {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Now(..)")
    }
}

/// What a request body's error is turned into.
type BoxError = Box<dyn std::error::Error + Send + Sync>;
