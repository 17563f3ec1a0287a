//! behest-agent: machine-to-machine access to Behest for CI runners and scripts.
//!
//! # Layout
//!
//! - [`config`]: the TOML file + environment model, validated into [`config::Settings`].
//! - [`tls`]: the one rustls client configuration (system roots + an optional CA file).
//! - [`auth`]: endpoints and discovery, client authentication, the client-credentials grant.
//! - [`token`]: claims and checks, JWKS, the disk cache, and [`token::TokenSource`], the one handle
//!   everything else uses to get a token.
//! - [`fleet`]: the token shared by every agent of a fleet through Redis (`[fleet]`), asked by the
//!   token engine before any grant.
//! - [`proxy`]: the loopback OpenAI proxy: listeners, guards, forwarding with the token, streaming.
//! - [`control`]: the Unix-socket API of a running daemon, and its client.
//! - [`app`]: the daemon assembled from those parts, with reload.
//! - [`service`]: systemd notifications (ready, status, watchdog).
//! - [`telemetry`]: logs and Prometheus metrics.
//! - [`fds`]: the file descriptor limit, raised at start, and the connection bounds that fit in it.
//! - [`server`]: the one accept loop (connection bound, protocol limits, idle watchdog, drain)
//!   that serves the proxy, the control socket, the metrics and `dev`'s servers.
//! - [`keys`]: local keys (`proxy.require_key`): the hashed keys file and the lookup the proxy does.
//! - [`cli`]: one file per subcommand; the binary's `main` only maps errors to exit codes.
//! - [`clock`]: injected wall-clock time.
//!
//! The embedded Auth0-compatible IdP and the echo upstream that `dev`, the tests and the fuzzers
//! run are not here: they are the `devkit` crate of this workspace, test support rather than
//! product code.
//!
//! Data flows one way: config → settings → `TokenSource` → proxy and control API. The CLI commands
//! are clients of the control API, or build a `TokenSource` in-process when no daemon runs.

#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod egress;
pub mod fds;
pub mod fleet;
pub mod keys;
pub mod lockfile;
pub mod owner;
pub mod proxy;
pub mod server;
pub mod service;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod usage;
