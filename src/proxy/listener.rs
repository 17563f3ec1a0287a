//! The proxy's sockets and connections: binding TCP and Unix listeners, the accept loop bounded by
//! `max_connections`, HTTP/1.1 keep-alive and h2c (prior knowledge, told by the first bytes),
//! the request-head limits, and graceful shutdown. It never looks inside a request: each one goes
//! to [`Forwarder::handle`].
//!
//! Limits, and who enforces them:
//! - Connections: a semaphore permit is taken *before* `accept`, so connections beyond
//!   `max_connections` wait in the kernel's backlog (and time out there on the client's side if it
//!   stays full); none is accepted only to be dropped.
//! - HTTP/1 request heads: hyper's read buffer is capped at [`MAX_HEAD`] and its header count at
//!   [`MAX_HEADERS`]; over either, hyper itself answers `431` and closes (it can while no response is
//!   being written on the connection; a pipelined head arriving mid-response only closes it).
//!   A head not complete within `header_read_timeout` closes the connection without an answer.
//! - h2 request heads: `SETTINGS_MAX_HEADER_LIST_SIZE` is [`MAX_HEAD`]; the h2 crate answers `431`
//!   to a larger header block; more than [`MAX_HEADERS`] fields get `431` from the handler.
//! - Framing conflicts: see [`super::framing`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::task::AtomicWaker;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Shared;
use super::forward::{ConnInfo, MAX_HEADERS};
use super::framing::{Framing, Protocol, Watched};
use super::timer::{ConnTimer, after_from};
use crate::config::ListenAddr;

/// The largest request head accepted (request line and all fields).
pub const MAX_HEAD: usize = 32 * 1024;
/// Mode of a Unix listening socket: the owner and its group may connect.
pub const UNIX_SOCKET_MODE: u32 = 0o660;

/// What the server needs besides the forwarder.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub shutdown_grace: Duration,
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// Removes its socket file when dropped.
    Unix(UnixSocket),
}

#[derive(Debug)]
pub struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Listener {
    /// Where it listens (the real port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(ListenAddr::Tcp),
            Listener::Unix(u) => Ok(ListenAddr::Unix(u.path.clone())),
        }
    }

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Stream, Option<SocketAddr>)>> {
        match self {
            Listener::Tcp(l) => l.poll_accept(cx).map_ok(|(s, _peer)| {
                let local = s.local_addr().ok();
                let _ = s.set_nodelay(true);
                (Stream::Tcp(s), local)
            }),
            Listener::Unix(u) => u
                .listener
                .poll_accept(cx)
                .map_ok(|(s, _)| (Stream::Unix(s), None)),
        }
    }
}

/// Binds every address; a Unix socket gets mode 0660, and a stale socket file left by a dead
/// process is replaced (a live one is an error).
pub async fn bind(listen: &[ListenAddr]) -> io::Result<Vec<Listener>> {
    let mut out = Vec::with_capacity(listen.len());
    for addr in listen {
        let l = bind_one(addr)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        out.push(l);
    }
    Ok(out)
}

async fn bind_one(addr: &ListenAddr) -> io::Result<Listener> {
    match addr {
        ListenAddr::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a).await?)),
        ListenAddr::Unix(path) => {
            if path.exists() {
                if UnixStream::connect(path).await.is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another process answers on this socket",
                    ));
                }
                std::fs::remove_file(path)?;
            }
            let listener = UnixListener::bind(path)?;
            let socket = UnixSocket {
                listener,
                path: path.clone(),
            };
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(UNIX_SOCKET_MODE))?;
            Ok(Listener::Unix(socket))
        }
    }
}

/// An accepted connection.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// hyper's HTTP/1 and h2 server settings, shared by the connections.
struct Builders {
    http1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

fn builders(limits: &Limits) -> Builders {
    let mut http1 = http1::Builder::new();
    let header_read_timeout = Some(limits.header_read_timeout).filter(|d| !d.is_zero());
    // Its timer is the connection's own, set at accept (see `ConnTimer`).
    http1
        .header_read_timeout(header_read_timeout)
        .max_buf_size(MAX_HEAD)
        .max_headers(MAX_HEADERS)
        .keep_alive(true)
        // Each write gathers the head and the body's frames in one buffer: for the small bodies
        // of LLM calls, the copy costs less than a vectored write (measured: see
        // bench/experiments/README.md).
        .writev(false);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD as u32);
    Builders { http1, h2 }
}

/// Accepts on every listener until `shutdown`, then lets open connections finish their requests
/// and streams for up to `shutdown_grace`, cuts what is left, and returns.
pub async fn serve(shared: Arc<Shared>, listeners: Vec<Listener>, shutdown: CancellationToken) {
    let limits = shared.limits;
    let builders = Arc::new(builders(&limits));
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let stop = Arc::new(Stop::default());
    let tracker = TaskTracker::new();
    let mut next = 0usize;

    loop {
        let permit = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => p.expect("the connection semaphore is never closed"),
        };
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            a = std::future::poll_fn(|cx| accept_any(&listeners, &mut next, cx)) => a,
        };
        let (stream, local) = match accepted {
            Ok(a) => a,
            Err(error) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!(%error, "the proxy failed to accept a connection");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        let shared = shared.clone();
        let builders = builders.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            let _permit = permit;
            // Counted on the forwarder current at accept time, and uncounted on the same one.
            let counted = shared.forwarder();
            counted.stats.connections.fetch_add(1, Ordering::Relaxed);
            let framing = Arc::new(Framing::default());
            let timer = ConnTimer::default();
            let info = Arc::new(ConnInfo {
                local: local.map(super::guard::Local::new),
                framing: framing.clone(),
                requests: AtomicU64::new(0),
                timer: timer.clone(),
            });
            let service = {
                let shared = shared.clone();
                service_fn(move |req| {
                    // The forwarder current when the request arrives (a reload may swap it).
                    // The handler's future itself, mapped: an `async` block around it would be
                    // one more (large) future to build and move per request.
                    shared
                        .forwarder()
                        .handle(info.clone(), req)
                        .map(Ok::<_, Infallible>)
                })
            };
            // Accepted now: the first bytes are due within the head-read timeout (hyper's takes
            // over for HTTP/1 heads once they told the protocol).
            let mut io = Watched::new(stream, framing);
            let told = Told {
                io: &mut io,
                deadline: (!limits.header_read_timeout.is_zero())
                    .then(|| after_from(Instant::now(), limits.header_read_timeout)),
                timer: &timer,
                stopped: false,
            };
            // HTTP/1 and h2c are served by hyper's own connections, not hyper-util's `auto` one,
            // whose state and replay layer every poll went through (measured: see
            // bench/experiments/README.md).
            let ended = match Stoppable::new(&stop, std::pin::pin!(told), Told::stop).await {
                Some(Ok(Protocol::Http1)) => {
                    // hyper times each head on the connection's timer (see `ConnTimer`).
                    let mut http1 = builders.http1.clone();
                    http1.timer(timer);
                    let conn = std::pin::pin!(http1.serve_connection(TokioIo::new(io), service));
                    Stoppable::new(&stop, conn, |c| c.graceful_shutdown())
                        .await
                        .map(|r| r.map_err(|e| e.to_string()))
                }
                Some(Ok(Protocol::H2)) => {
                    let conn =
                        std::pin::pin!(builders.h2.serve_connection(TokioIo::new(io), service));
                    Stoppable::new(&stop, conn, |c| c.graceful_shutdown())
                        .await
                        .map(|r| r.map_err(|e| e.to_string()))
                }
                Some(Ok(Protocol::Closed)) => Some(Ok(())),
                Some(Err(e)) => Some(Err(e.to_string())),
                None => None,
            };
            match ended {
                Some(Err(error)) => tracing::debug!(%error, "proxy connection ended with an error"),
                Some(Ok(())) => {}
                None => tracing::debug!("proxy connection cut at the end of the shutdown grace"),
            }
            counted.stats.connections.fetch_sub(1, Ordering::Relaxed);
        });
    }

    // Stop accepting (and remove Unix socket files) before waiting.
    drop(listeners);
    tracker.close();
    stop.set(Stop::GRACEFUL);
    if tokio::time::timeout(limits.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::info!(
            grace = %humantime::format_duration(limits.shutdown_grace),
            "shutdown grace over; cutting the proxy connections still open"
        );
        stop.set(Stop::CUT);
    }
    tracker.wait().await;
}

/// Tells the open connections to finish (no new request on a kept-alive connection, the current
/// ones run to their end) and later to stop at once. It costs a connection one atomic load and one
/// waker check per poll; hyper-util's graceful watcher and a `select!` on a cancellation token cost
/// two mutex round trips per poll instead.
#[derive(Default)]
struct Stop {
    phase: AtomicU8,
    /// The wakers of the open connections, so a phase change is seen at once.
    open: Mutex<HashMap<u64, Arc<AtomicWaker>>>,
    next: AtomicU64,
}

impl Stop {
    const GRACEFUL: u8 = 1;
    const CUT: u8 = 2;

    fn set(&self, phase: u8) {
        self.phase.store(phase, Ordering::SeqCst);
        for w in self.open.lock().expect("stop lock").values() {
            w.wake();
        }
    }
}

/// A connection under a [`Stop`], with how to tell it to finish: `None` when it was cut.
struct Stoppable<'a, C, G> {
    stop: &'a Stop,
    id: u64,
    waker: Arc<AtomicWaker>,
    conn: Pin<&'a mut C>,
    graceful: Option<G>,
}

impl<'a, C, G: FnOnce(Pin<&mut C>) + Unpin> Stoppable<'a, C, G> {
    fn new(stop: &'a Stop, conn: Pin<&'a mut C>, graceful: G) -> Self {
        let id = stop.next.fetch_add(1, Ordering::Relaxed);
        let waker = Arc::new(AtomicWaker::new());
        stop.open
            .lock()
            .expect("stop lock")
            .insert(id, waker.clone());
        Stoppable {
            stop,
            id,
            waker,
            conn,
            graceful: Some(graceful),
        }
    }
}

impl<C, G> Drop for Stoppable<'_, C, G> {
    fn drop(&mut self) {
        self.stop.open.lock().expect("stop lock").remove(&self.id);
    }
}

impl<C: Future, G: FnOnce(Pin<&mut C>) + Unpin> Future for Stoppable<'_, C, G> {
    type Output = Option<C::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Registered before the phase is read, so a change made after the read wakes this task.
        self.waker.register(cx.waker());
        match self.stop.phase.load(Ordering::SeqCst) {
            Stop::CUT => return Poll::Ready(None),
            Stop::GRACEFUL => {
                if let Some(graceful) = self.graceful.take() {
                    graceful(self.conn.as_mut());
                }
            }
            _ => {}
        }
        self.conn.as_mut().poll(cx).map(Some)
    }
}

/// A connection's first bytes, read to tell its protocol, due by `deadline`. Told to finish (a
/// graceful shutdown) before they came, it ends as closed.
struct Told<'a, S> {
    io: &'a mut Watched<S>,
    deadline: Option<Instant>,
    timer: &'a ConnTimer,
    stopped: bool,
}

impl<S> Told<'_, S> {
    fn stop(mut self: Pin<&mut Self>) {
        self.stopped = true;
    }
}

impl<S: AsyncRead + Unpin> Future for Told<'_, S> {
    type Output = io::Result<Protocol>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.stopped {
            return Poll::Ready(Ok(Protocol::Closed));
        }
        if let Poll::Ready(told) = self.io.poll_protocol(cx) {
            return Poll::Ready(told);
        }
        match self.deadline {
            Some(deadline) if self.timer.poll_until(deadline, cx).is_ready() => {
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within proxy.header_read_timeout",
                )))
            }
            _ => Poll::Pending,
        }
    }
}

/// The next connection on any listener, starting the scan one further each time so a busy
/// listener cannot starve the others.
fn accept_any(
    listeners: &[Listener],
    next: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<(Stream, Option<SocketAddr>)>> {
    let n = listeners.len();
    for i in 0..n {
        let idx = (*next + i) % n;
        if let Poll::Ready(r) = listeners[idx].poll_accept(cx) {
            *next = (idx + 1) % n;
            return Poll::Ready(r);
        }
    }
    Poll::Pending
}
