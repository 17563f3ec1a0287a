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

pub use crate::token::Identity;
pub use client::{ControlError, Daemon};
pub use server::{ControlState, bind, serve};

/// What the daemon says of a profile it does not serve, naming the ones it does (`known`): the
/// control API's `unknown_profile` answer and the CLI's check of `/v1/status` say the same.
pub fn unknown_profile(name: &str, known: &[String]) -> String {
    format!(
        "the daemon has no profile `{}` (profiles: {}); add [profiles.{}] to its configuration and reload it, or use one of those",
        name.escape_debug(),
        known.join(", "),
        name.escape_debug()
    )
}
