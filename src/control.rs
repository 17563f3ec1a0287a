//! The control API of a running daemon: HTTP/1.1 on a Unix socket (mode 0660 by default, in a 0750
//! directory, or the user's private 0700 one), used by `token`, `status`, `refresh`, `exec`, `env`,
//! `usage`, `wait`, `stop` and `doctor`. Routes: `GET /v1/token?min_ttl=`, `POST /v1/refresh`,
//! `GET /v1/status`, `GET /v1/usage`, `POST /v1/shutdown` (stop as on SIGTERM), `GET /healthz`,
//! `GET /readyz`. Only `/v1/token` ever returns the token; the socket's permissions are what
//! protect it on the daemon's side. On the CLI's side, [`client::Daemon`] trusts a socket only
//! when the process behind it is this user, root or the service's user, and only when the
//! daemon's [`Identity`] is the one the CLI's configuration names.

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

pub use client::{ControlError, Daemon};
pub use server::{ControlState, bind, serve};

use crate::config::AuthSettings;

/// Who a daemon's tokens are for: what makes two configurations get different tokens from the
/// IdP. Reported in `/v1/status` as `daemon.identity`, compared by the CLI with its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub issuer: String,
    pub client_id: String,
    pub audience: Option<String>,
    pub resource: Option<String>,
    pub organization: Option<String>,
    pub scope: Option<String>,
}

impl Identity {
    pub fn of(auth: &AuthSettings) -> Identity {
        Identity {
            issuer: auth.endpoints.issuer_hint(),
            client_id: auth.client_id.clone(),
            audience: auth.audience.clone(),
            resource: auth.resource.clone(),
            organization: auth.organization.clone(),
            scope: auth.scope.clone(),
        }
    }

    /// The fields that differ, as `(key, this one's value, other's value)`; `-` for none.
    pub fn differences(&self, other: &Identity) -> Vec<(&'static str, String, String)> {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        [
            ("issuer", self.issuer.clone(), other.issuer.clone()),
            ("client_id", self.client_id.clone(), other.client_id.clone()),
            ("audience", show(&self.audience), show(&other.audience)),
            ("resource", show(&self.resource), show(&other.resource)),
            (
                "organization",
                show(&self.organization),
                show(&other.organization),
            ),
            ("scope", show(&self.scope), show(&other.scope)),
        ]
        .into_iter()
        .filter(|(_, a, b)| a != b)
        .collect()
    }
}
