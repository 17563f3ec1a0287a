//! `bench-servers`: the IdP and the streaming upstream of `bench/run.sh`. They are devkit's — the
//! embedded IdP and the echo upstream that `behest-agent dev` and the tests use — served on the
//! loopback ports the script picks by the agent's own accept loop (`behest_agent::server::serve`),
//! so the benchmark has no server of its own to keep in step with the product's.
//!
//! - The IdP port answers the IdP (`/oauth/token`, the JWKS, discovery) and, under `/bench/`, what
//!   the script needs from it: the grant count, a token for nginx's configuration, a slow first
//!   grant for the burst, and when each streamed event left the upstream.
//! - The upstream port answers the echo upstream in fast mode (any bearer but the placeholder;
//!   signatures are not checked, as nginx, the request cells' upstream, checks none either). A
//!   streamed completion sends `x-echo-events` content events `--sse-interval-ms` apart; a request
//!   with `x-bench-hold` goes to a second echo upstream whose events are `--hold-sse-interval-ms`
//!   apart, for the thousand streams held open at once.
//!
//! It logs nothing and keeps no secret but the client's, which it takes from the environment.

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context as _;
use behest_agent::server::{self, Limits, Listener};
use bytes::Bytes;
use clap::Parser;
use devkit::idp::{Fault, Idp, IdpOptions};
use devkit::upstream::{Upstream, UpstreamOptions};
use http::header::CONTENT_TYPE;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::{Service as _, service_fn};
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

/// Request header that sends a stream to the slowly paced upstream.
const HOLD_HEADER: &str = "x-bench-hold";
/// Request header naming a measured stream, so its send times can be looked up.
const TAG_HEADER: &str = "x-bench-tag";

/// Room for the thousand held streams through each proxy, and their connections still closing.
const LIMITS: Limits = Limits {
    max_connections: 8192,
    header_read_timeout: Duration::from_secs(10),
    // Longer than the proxies keep idle upstream connections (nginx: 300 s, the agent: 30 s), so
    // neither ever sends a request on a connection this side is closing.
    idle_timeout: Duration::from_secs(600),
    shutdown_grace: Duration::from_secs(1),
};
/// Connections waiting to be accepted, as nginx's `listen ... backlog=4096`.
const BACKLOG: u32 = 4096;

/// The benchmark's IdP and streaming upstream (devkit's), on fixed loopback ports.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Where the IdP and the /bench/ routes listen
    #[arg(long, value_name = "ADDR")]
    idp: SocketAddr,
    /// Where the echo upstream listens
    #[arg(long, value_name = "ADDR")]
    upstream: SocketAddr,
    /// The IdP's one client
    #[arg(long)]
    client_id: String,
    /// Its secret
    #[arg(long, env = "BENCH_CLIENT_SECRET", hide_env_values = true)]
    client_secret: String,
    /// The API identifier tokens are issued for
    #[arg(long)]
    audience: String,
    /// Lifetime of issued tokens, seconds
    #[arg(long, default_value_t = 86_400, value_name = "SECONDS")]
    token_ttl_s: u64,
    /// Pause between two events of a streamed completion, milliseconds
    #[arg(long, default_value_t = 20, value_name = "MS")]
    sse_interval_ms: u64,
    /// The same for streams sent with `x-bench-hold`
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    hold_sse_interval_ms: u64,
}

/// What the `/bench/` routes read and steer.
#[derive(Clone)]
struct Bench {
    idp: Idp,
    /// The upstream of the measured streams; the held ones go to another, unread here.
    upstream: Upstream,
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>>;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // One thread, as the proxies under test and nginx's upstream have: on a two-core machine the
    // script gives the upstreams the proxy's core, and they should not spread over both.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();

    let idp_listener = listen(args.idp).await?;
    let mut opts = IdpOptions::new(&args.client_id, &args.client_secret, &args.audience);
    opts.token_ttl = Duration::from_secs(args.token_ttl_s);
    let idp = Idp::new(args.idp, opts);

    let upstream_listener = listen(args.upstream).await?;
    let paced = |ms| {
        let mut opts = UpstreamOptions::new(&args.audience);
        opts.sse_interval = Duration::from_millis(ms);
        Upstream::new(args.upstream, opts)
    };
    let upstream = paced(args.sse_interval_ms);
    let held = paced(args.hold_sse_interval_ms);

    let bench = Bench {
        idp: idp.clone(),
        upstream: upstream.clone(),
    };
    let idp_service = idp.service();
    let idp_server = server::serve(
        vec![Listener::Tcp(idp_listener)],
        LIMITS,
        move |_| {
            let (bench, idp_service) = (bench.clone(), idp_service.clone());
            service_fn(move |request: Request<Incoming>| -> Answer {
                if request.uri().path().starts_with("/bench/") {
                    let response = bench.answer(&request);
                    Box::pin(async move { Ok(response) })
                } else {
                    idp_service.call(request)
                }
            })
        },
        shutdown.clone(),
    );

    let (measured, held) = (
        upstream.service(shutdown.clone()),
        held.service(shutdown.clone()),
    );
    let upstream_server = server::serve(
        vec![Listener::Tcp(upstream_listener)],
        LIMITS,
        move |_| {
            let (measured, held) = (measured.clone(), held.clone());
            service_fn(move |request: Request<Incoming>| {
                if request.headers().contains_key(HOLD_HEADER) {
                    held.call(request)
                } else {
                    measured.call(request)
                }
            })
        },
        shutdown.clone(),
    );

    let stop = shutdown.clone();
    tokio::spawn(async move {
        stop_signal().await;
        stop.cancel();
    });
    tokio::join!(idp_server, upstream_server);
    Ok(())
}

/// A listener on `addr` with a deep backlog: a thousand streams are opened at once.
async fn listen(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .and_then(|()| socket.listen(BACKLOG))
        .with_context(|| format!("cannot listen on {addr}"))
}

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

impl Bench {
    /// The `/bench/` routes:
    ///
    /// - `GET /bench/stats`: `{"grants", "token_requests", "upstream_requests"}`.
    /// - `POST /bench/token`: `{"access_token"}`, a token as a grant would carry, not counted as
    ///   one (nginx's configuration injects it).
    /// - `POST /bench/delay-next-grant?ms=N`: the next token request is answered N ms late, so a
    ///   burst can arrive while an agent's first grant is in flight.
    /// - `GET /bench/sse-sent?prefix=P`: for each measured stream whose `x-bench-tag` starts with
    ///   P, when each of its events was handed to the connection (Unix time, ms).
    fn answer(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let query = |name: &str| query_param(request.uri().query().unwrap_or(""), name);
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/bench/stats") => json_response(
                StatusCode::OK,
                &json!({
                    "grants": self.idp.grants(),
                    "token_requests": self.idp.token_requests(),
                    "upstream_requests": self.upstream.request_count(),
                }),
            ),
            (&Method::POST, "/bench/token") => json_response(
                StatusCode::OK,
                &json!({ "access_token": self.idp.mint(json!({})) }),
            ),
            (&Method::POST, "/bench/delay-next-grant") => {
                match query("ms").and_then(|ms| ms.parse::<u64>().ok()) {
                    Some(ms) => {
                        self.idp
                            .fail_next(1, Fault::Delay(Duration::from_millis(ms)));
                        json_response(StatusCode::OK, &json!({ "delay_ms": ms }))
                    }
                    None => json_response(
                        StatusCode::BAD_REQUEST,
                        &json!({"error": "ms=MILLISECONDS is required"}),
                    ),
                }
            }
            (&Method::GET, "/bench/sse-sent") => {
                let prefix = query("prefix").unwrap_or_default();
                let mut streams = Map::new();
                for recorded in self.upstream.requests() {
                    let Some(tag) = recorded.header(TAG_HEADER) else {
                        continue;
                    };
                    if !tag.starts_with(prefix) {
                        continue;
                    }
                    let sent: Vec<Value> = recorded
                        .sse_sent_at
                        .iter()
                        .map(|at| {
                            let ms = at.duration_since(UNIX_EPOCH).unwrap_or_default();
                            json!(ms.as_secs_f64() * 1000.0)
                        })
                        .collect();
                    streams.insert(tag.to_owned(), Value::Array(sent));
                }
                json_response(StatusCode::OK, &Value::Object(streams))
            }
            _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"})),
        }
    }
}

/// The value of `name` in a query string of plain `name=value` pairs (the script sends no
/// escapes).
fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find_map(|(key, value)| (key == name).then_some(value))
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}
