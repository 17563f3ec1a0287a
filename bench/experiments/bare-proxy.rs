// A floor for the proxy's cost on behest-agent's own stack: the least a hyper 1 proxy does per
// request (not part of the crate, CI or bench/run.sh). Measured beside the agent and nginx with
//   bench/experiments/ab.sh 6 128 "agent=target/release/behest-agent" "bare=raw:/tmp/bare/target/release/bare-proxy"
// Build it in a scratch crate with the agent's lock file, so the versions are the agent's:
//   mkdir -p /tmp/bare/src && cp bench/experiments/bare-proxy.rs /tmp/bare/src/main.rs
//   cp Cargo.lock /tmp/bare/ && cat > /tmp/bare/Cargo.toml <<'TOML'
//   [package]
//   name = "bare-proxy"
//   version = "0.1.0"
//   edition = "2024"
//   [dependencies]
//   hyper = { version = "1", features = ["http1", "server", "client"] }
//   hyper-util = { version = "0.1", features = ["tokio"] }
//   http = "1"
//   tokio = { version = "1", features = ["rt", "net", "macros"] }
//   tikv-jemallocator = "0.6"
//   [profile.release]
//   lto = "thin"
//   codegen-units = 1
//   TOML
//   (cd /tmp/bare && cargo build --release)
//! The least a hyper 1 proxy can do per request: one current-thread runtime, hyper's HTTP/1
//! server and client connection API, a stack of idle upstream senders, the client's Host and
//! Authorization replaced, the response streamed back. No guards, no metrics, no timeouts, no
//! framing watch, no replay: a floor for what behest-agent's proxy costs on the same stack.
//!
//!   bare-proxy LISTEN_ADDR UPSTREAM_ADDR BEARER
use std::sync::{Arc, Mutex};

use http::header::{AUTHORIZATION, HOST, HeaderValue};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

type Pool = Arc<Mutex<Vec<SendRequest<Incoming>>>>;

async fn sender(pool: &Pool, upstream: &str) -> SendRequest<Incoming> {
    loop {
        let popped = pool.lock().unwrap().pop();
        match popped {
            Some(mut s) => {
                if s.ready().await.is_ok() {
                    return s;
                }
            }
            None => {
                let tcp = TcpStream::connect(upstream).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let (s, conn) = hyper::client::conn::http1::Builder::new()
                    .writev(false)
                    .handshake(TokioIo::new(tcp))
                    .await
                    .unwrap();
                tokio::spawn(conn);
                return s;
            }
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listener = TcpListener::bind(&args[1]).await.unwrap();
    let upstream: Arc<str> = args[2].clone().into();
    let bearer = HeaderValue::from_str(&format!("Bearer {}", args[3])).unwrap();
    let pool: Pool = Arc::default();
    loop {
        let (tcp, _) = listener.accept().await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let (pool, upstream, bearer) = (pool.clone(), upstream.clone(), bearer.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |mut req: Request<Incoming>| {
                let (pool, upstream, bearer) = (pool.clone(), upstream.clone(), bearer.clone());
                let host = HeaderValue::from_str(&upstream).unwrap();
                async move {
                    req.headers_mut().insert(HOST, host);
                    req.headers_mut().insert(AUTHORIZATION, bearer);
                    let mut s = sender(&pool, &upstream).await;
                    let resp = s.send_request(req).await;
                    pool.lock().unwrap().push(s);
                    resp.map(|r: Response<Incoming>| r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .writev(false)
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
