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
