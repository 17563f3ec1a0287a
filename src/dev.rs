//! The embedded default: in-process stand-ins for the services the agent talks to, used by
//! `behest-agent dev`, the integration tests (fault injection) and the benchmark.
//!
//! Layout:
//! - [`idp`]: an Auth0-compatible OAuth2 server (client-credentials grant, RS256 JWTs, JWKS,
//!   discovery) with switchable faults.
//! - [`upstream`]: the OpenAI-compatible echo upstream that verifies the IdP's tokens as Behest does,
//!   streams SSE, takes uploads, records what it received, and takes faults.
//! - [`serve`]: the accept loop they all share. Servers here take a bound listener and a
//!   [`CancellationToken`], so tests bind `127.0.0.1:0` and stop them by cancelling.
//!
//! Nothing in this module is meant for production traffic: no TLS, loopback only, keys in memory.
//! It must still never log or format a secret, because the tests check that the agent does not.

pub mod idp;
pub mod upstream;

use std::error::Error as StdError;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long [`serve`] lets open connections finish after shutdown before dropping them. Short,
/// because the only long-lived connections here are test streams whose client is going away too.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves HTTP/1.1 (and h2c, via hyper-util's auto builder) on every connection `listener`
/// accepts, answering each request with `service`, until `shutdown` is cancelled.
///
/// The response body type is generic so a server can stream (an SSE echo upstream uses a boxed
/// body such as `http_body_util::combinators::BoxBody<Bytes, std::io::Error>`) or answer with a
/// plain `Full<Bytes>`. On shutdown the listener is closed at once, open connections get
/// `SHUTDOWN_GRACE` to finish their in-flight requests, and whatever is left is dropped.
pub async fn serve<S, B>(listener: TcpListener, service: S, shutdown: CancellationToken)
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    // Owning the connection tasks lets shutdown drop the stragglers instead of leaking them.
    let mut connections = JoinSet::new();

    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next() => {}
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off rather than spin.
                        tracing::warn!(%error, "dev server failed to accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let connection = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service.clone())
                    .into_owned();
                connections.spawn(graceful.watch(connection));
            }
        }
    }

    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::debug!("dev server dropped connections still open after the shutdown grace");
        }
    }
}
