//! The control API of a running daemon: HTTP/1.1 on a Unix socket (mode 0660 by default, in a 0750
//! directory), used by `token`, `status`, `refresh`, `exec`, `env`, `wait` and `stop`. Routes:
//! `GET /v1/token?min_ttl=`, `POST /v1/refresh`, `GET /v1/status`, `POST /v1/shutdown` (stop as on
//! SIGTERM), `GET /healthz`, `GET /readyz`. Only `/v1/token` ever returns the token; the socket's
//! permissions are what protect it.

pub mod client;
pub mod server;

pub use client::ControlClient;
pub use server::{ControlState, bind, serve};
