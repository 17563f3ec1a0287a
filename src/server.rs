//! The one accept loop: the proxy, the control socket, the metrics endpoint and `behest-agent dev`'s
//! servers are all served by [`serve`], with the same limits. It owns listening sockets, the
//! connection bound, the protocol limits (HTTP/1.1 keep-alive and h2c, told apart by hyper-util),
//! the idle watchdog and the graceful drain. It never looks inside a request.
//!
//! Limits, and who enforces them:
//! - Connections: a permit is taken *before* `accept`, so connections beyond `max_connections`
//!   wait in the kernel's backlog; none is accepted only to be dropped.
//! - HTTP/1 request heads: hyper caps its read buffer at [`MAX_HEAD`] and the field count at
//!   [`MAX_HEADERS`] and answers 431 beyond them; a head not complete within
//!   `header_read_timeout` closes the connection (hyper's timer, which also runs while a kept-alive
//!   connection waits for its next request).
//! - h2: `SETTINGS_MAX_HEADER_LIST_SIZE` is [`MAX_HEAD`], at most [`MAX_STREAMS`] concurrent streams.
//! - Idle connections: when no byte has moved either way for `idle_timeout` and no request waits
//!   for its response head, the connection is closed. That ends idle h2c connections and clients
//!   that stopped reading a stream; so does an h2 response body the client has not taken a frame
//!   of for `idle_timeout` (a stream whose window stays shut while PINGs or other streams keep
//!   bytes moving). A connection that has not sent a whole request within `header_read_timeout`
//!   of its accept is closed too (before hyper knows its protocol).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::service::{Service, service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ListenAddr;

/// The largest request head accepted (request line and all fields).
pub const MAX_HEAD: usize = 32 * 1024;
/// More fields than this in a request head get 431 (hyper's own default on HTTP/1).
pub const MAX_HEADERS: usize = 100;
/// Concurrent h2 streams per client connection.
pub const MAX_STREAMS: u32 = 100;
/// Mode of a Unix listening socket: the owner and its group may connect.
pub const UNIX_SOCKET_MODE: u32 = 0o660;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A service [`serve`] can answer requests with.
pub trait HttpService<B>:
    Service<Request<Incoming>, Response = Response<B>, Error = Infallible, Future: Send + 'static>
    + Send
    + Sync
    + 'static
{
}

impl<T, B> HttpService<B> for T where
    T: Service<
            Request<Incoming>,
            Response = Response<B>,
            Error = Infallible,
            Future: Send + 'static,
        > + Send
        + Sync
        + 'static
{
}

/// A response body [`serve`] can send.
pub trait HttpBody: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

impl<T: Body<Data: Send, Error: Into<BoxError>> + Send + 'static> HttpBody for T {}

/// How a server bounds its connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// No byte either way for this long, with no request waiting for its response: closed.
    pub idle_timeout: Duration,
    /// After shutdown, how long open connections may finish their requests.
    pub shutdown_grace: Duration,
}

impl Limits {
    /// The limits of a small local server (control socket, metrics, dev servers).
    pub const LOCAL: Limits = Limits {
        max_connections: 64,
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        shutdown_grace: Duration::from_secs(5),
    };
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// Removes its socket file when dropped.
    Unix(UnixSocket),
}

/// A listening Unix socket and its path.
#[derive(Debug)]
pub struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file this process created (device, inode): the only file it ever removes.
    created: (u64, u64),
}

impl Drop for UnixSocket {
    /// Removes the socket file, unless it is no longer the one this process created (a newer
    /// daemon's socket at the same path stays).
    fn drop(&mut self) {
        let Some(_lock) = DirLock::try_for(&self.path, Duration::from_secs(2)) else {
            tracing::debug!(path = %self.path.display(), "socket left in place: its directory stayed locked");
            return;
        };
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.created
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// An accepted connection.
pub type Stream = Either<TcpStream, UnixStream>;

/// What a service knows of the connection it serves.
#[derive(Debug, Clone, Copy)]
pub struct Conn {
    /// The TCP address it was accepted on; `None` on a Unix socket.
    pub local: Option<SocketAddr>,
}

impl Listener {
    /// Where it listens (the real port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(ListenAddr::Tcp),
            Listener::Unix(u) => Ok(ListenAddr::Unix(u.path.clone())),
        }
    }

    async fn accept(&self) -> io::Result<(Stream, Conn)> {
        match self {
            Listener::Tcp(l) => {
                let (s, _peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                let local = s.local_addr().ok();
                Ok((Either::Left(s), Conn { local }))
            }
            Listener::Unix(u) => {
                let (s, _peer) = u.listener.accept().await?;
                Ok((Either::Right(s), Conn { local: None }))
            }
        }
    }
}

/// Binds every address; a Unix socket gets mode 0660 as [`bind_unix`] binds it.
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
        ListenAddr::Unix(path) => bind_unix(path, UNIX_SOCKET_MODE).await,
    }
}

/// Binds a Unix socket at `path` with `mode`, and only there:
///
/// - No other process can connect before the socket has `mode`: it is bound in a fresh 0700
///   directory next to `path`, given its mode, and only then renamed into place (a connection
///   accepted before a `chmod` would outlive it).
/// - A stale socket file (nobody listens) is replaced; a live one is an error (`AddrInUse`); a
///   path that is not a socket (a file, a symlink, a directory) is never touched.
/// - A directory every user may write, or one another user owns, is refused: another user could
///   plant a socket there first, or replace this one. So is one below a directory another user
///   owns or every user may write without the sticky bit: they could move the whole directory.
/// - The check and the rename happen under a lock on the directory, so of several processes
///   racing for the same stale socket exactly one gets it.
///
/// The listener removes its socket file when dropped, if it is still the one bound here.
pub async fn bind_unix(path: &Path, mode: u32) -> io::Result<Listener> {
    let dir = socket_dir(path);
    let meta = std::fs::metadata(dir)?;
    if let Some(why) = crate::owner::untrusted(&meta) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "its directory {}: {why} (its owner could replace the socket)",
                dir.display()
            ),
        ));
    }
    if meta.mode() & 0o002 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "its directory {} is writable by every user (mode {:04o}): another user could put a socket there first, or replace this one; use a directory only its owner (and group) can write",
                dir.display(),
                meta.mode() & 0o7777
            ),
        ));
    }
    if let Some(why) = crate::owner::untrusted_ancestor(dir) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("its directory {}: {why}", dir.display()),
        ));
    }
    // sun_path holds 108 bytes with the terminating NUL.
    if path.as_os_str().len() > 107 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a Unix socket path may be at most 107 bytes long; use a shorter path",
        ));
    }
    let _lock = DirLock::wait_for(path, Duration::from_secs(10)).await?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "it exists and is not a socket; remove it yourself or choose another path",
            ));
        }
        Ok(_) => match UnixStream::connect(path).await {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process answers on this socket",
                ));
            }
            // Stale: the rename below replaces it.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // 0700 whatever the umask (tempfile's default is 0777 less the umask).
    let private = tempfile::Builder::new()
        .prefix(".bind")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(dir)?;
    let tmp = private.path().join("s");
    let listener = UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    let created = std::fs::symlink_metadata(&tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(Listener::Unix(UnixSocket {
        listener,
        path: path.to_path_buf(),
        created: (created.dev(), created.ino()),
    }))
}

/// The directory a socket file is in.
fn socket_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// An exclusive `flock` on a socket's directory, held while its socket file is checked and
/// replaced or removed; released when dropped.
struct DirLock {
    _dir: std::fs::File,
}

impl DirLock {
    fn try_once(socket: &Path) -> io::Result<Option<DirLock>> {
        let dir = std::fs::File::open(socket_dir(socket))?;
        match dir.try_lock() {
            Ok(()) => Ok(Some(DirLock { _dir: dir })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// Waits up to `bound` for the lock (the holder only checks and renames a file).
    async fn wait_for(socket: &Path, bound: Duration) -> io::Result<DirLock> {
        let end = Instant::now() + bound;
        loop {
            if let Some(lock) = Self::try_once(socket)? {
                return Ok(lock);
            }
            if Instant::now() >= end {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "another process has held the lock on {} for {}s",
                        socket_dir(socket).display(),
                        bound.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// For `Drop`, which cannot await: a few tries within `bound`, else `None`.
    fn try_for(socket: &Path, bound: Duration) -> Option<DirLock> {
        let end = std::time::Instant::now() + bound;
        loop {
            match Self::try_once(socket) {
                Ok(Some(lock)) => return Some(lock),
                Ok(None) if std::time::Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => return None,
            }
        }
    }
}

/// hyper's HTTP/1 and h2 settings: the same for every server.
fn builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .max_buf_size(MAX_HEAD)
        .keep_alive(true);
    // hyper's default field limit is MAX_HEADERS already; setting it explicitly would make
    // hyper heap-allocate and fill its header arrays for every request head (2.5% of the proxy's
    // instructions).
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD as u32)
        .max_concurrent_streams(MAX_STREAMS);
    b
}

/// Serves `listeners` until `shutdown`, answering each request with the service `make` builds
/// for its connection. Then stops accepting (Unix socket files are removed), lets open
/// connections finish their requests and streams for up to `shutdown_grace`, cuts the rest, and
/// returns.
pub async fn serve<L, M, S, B>(
    listeners: Vec<L>,
    limits: Limits,
    make: M,
    shutdown: CancellationToken,
) where
    L: Into<Arc<Listener>>,
    M: Fn(Conn) -> S + Clone + Send + 'static,
    S: HttpService<B>,
    B: HttpBody,
{
    serve_until(listeners, limits, make, shutdown.clone(), shutdown).await
}

/// [`serve`], accepting until `stop` and draining the connections from `drain` on. Until then a
/// connection accepted before `stop` goes on serving requests as long as it stays open: a reload
/// stops the old accept loops at once, and a client whose connection one of them had just
/// accepted is still answered (a graceful shutdown would close it before its request is read).
pub async fn serve_until<L, M, S, B>(
    listeners: Vec<L>,
    limits: Limits,
    make: M,
    stop: CancellationToken,
    drain: CancellationToken,
) where
    L: Into<Arc<Listener>>,
    M: Fn(Conn) -> S + Clone + Send + 'static,
    S: HttpService<B>,
    B: HttpBody,
{
    let shutdown = stop;
    let mut builder = builder();
    builder
        .http1()
        .header_read_timeout(Some(limits.header_read_timeout).filter(|d| !d.is_zero()));
    let server = Arc::new(Server {
        builder,
        limits,
        permits: Arc::new(Semaphore::new(limits.max_connections.max(1))),
        cut: CancellationToken::new(),
        connections: TaskTracker::new(),
    });
    let graceful = Arc::new(GracefulShutdown::new());
    let loops = TaskTracker::new();
    for listener in listeners {
        let (server, graceful) = (server.clone(), graceful.clone());
        loops.spawn(server.accept_loop(listener.into(), graceful, make.clone(), shutdown.clone()));
    }
    loops.close();
    loops.wait().await;

    server.connections.close();
    tokio::select! {
        () = drain.cancelled() => {}
        () = server.connections.wait() => return,
    }
    let graceful = Arc::into_inner(graceful).expect("the accept loops have ended");
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!(
            grace = %humantime::format_duration(limits.shutdown_grace),
            "shutdown grace over; cutting the connections still open"
        );
    }
    server.cut.cancel();
    server.connections.wait().await;
}

/// What the accept loops of one [`serve`] share.
struct Server {
    builder: auto::Builder<TokioExecutor>,
    limits: Limits,
    /// One per open connection, taken before `accept`.
    permits: Arc<Semaphore>,
    /// Cancelled when the grace is over: the connections still open are dropped.
    cut: CancellationToken,
    connections: TaskTracker,
}

impl Server {
    /// Accepts on `listener` until `shutdown`, then lets it go (a listener another `serve` shares,
    /// after a reload, stays open with it).
    async fn accept_loop<M, S, B>(
        self: Arc<Self>,
        listener: Arc<Listener>,
        graceful: Arc<GracefulShutdown>,
        make: M,
        shutdown: CancellationToken,
    ) where
        M: Fn(Conn) -> S,
        S: HttpService<B>,
        B: HttpBody,
    {
        loop {
            let accepted = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                a = async {
                    let permit = self.permits.clone().acquire_owned().await.expect("never closed");
                    (permit, listener.accept().await)
                } => a,
            };
            let (permit, (stream, conn)) = match accepted {
                (permit, Ok(a)) => (permit, a),
                (_, Err(error)) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(%error, "failed to accept a connection");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    }
                }
            };
            let activity = Arc::new(Activity::new());
            let service = {
                let (service, activity) = (make(conn), activity.clone());
                service_fn(move |req: Request<Incoming>| {
                    let waiting = Waiting::new(activity.clone());
                    // On HTTP/1 the bytes moving are this body's: the idle rule above covers it.
                    let owed = (req.version() == http::Version::HTTP_2).then(|| activity.clone());
                    let response = service.call(req);
                    async move {
                        let r = response.await;
                        drop(waiting);
                        r.map(|r| r.map(|body| Owed::new(body, owed)))
                    }
                })
            };
            let io = TokioIo::new(Watched {
                io: stream,
                activity: activity.clone(),
            });
            let watcher = graceful.watcher();
            let server = self.clone();
            self.connections.spawn(async move {
                let _permit = permit;
                let conn = server.builder.serve_connection(io, service).into_owned();
                tokio::select! {
                    ended = watcher.watch(conn) => if let Err(error) = ended {
                        tracing::debug!(%error, "connection ended with an error");
                    },
                    () = activity.stalled(server.limits) => tracing::debug!("closed an idle connection"),
                    () = server.cut.cancelled() => {}
                }
            });
        }
    }
}

/// What the idle watchdog reads: when a byte last moved, how many requests wait, and since when
/// the client owes each response body a read.
struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last read or write that moved a byte.
    last: AtomicU64,
    /// The response bodies' [`Owed`] marks.
    bodies: std::sync::Mutex<Vec<std::sync::Weak<AtomicU64>>>,
    /// Requests whose response head is not out yet.
    waiting: AtomicUsize,
    /// Requests seen so far.
    requests: AtomicU64,
    /// Told when the first request comes: the limit changes.
    first: tokio::sync::Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
            bodies: std::sync::Mutex::default(),
            waiting: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            first: tokio::sync::Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last.store(self.now(), Ordering::Relaxed);
    }

    /// Since when (milliseconds from `start`) the longest-owed response body has waited for the
    /// client to take its next frame.
    fn oldest_owed(&self) -> Option<u64> {
        let mut bodies = self.bodies.lock().expect("bodies lock");
        bodies.retain(|b| b.strong_count() > 0);
        bodies
            .iter()
            .filter_map(|b| b.upgrade().map(|b| b.load(Ordering::Relaxed)))
            .filter(|since| *since != NOT_OWED)
            .min()
    }

    /// Returns when the connection has been idle past its limit: `idle_timeout` from the last byte
    /// moved while no request waits for its response (that wait is bounded by the upstream
    /// timeout), or from when a response body was last taken by a client that has since stopped
    /// reading it (on h2c other streams and PINGs keep bytes moving); and before a first request,
    /// `header_read_timeout` from the accept too, bytes moving or not. A zero limit is no limit.
    async fn stalled(&self, limits: Limits) {
        let at = |ms: u64, limit: Duration| {
            (!limit.is_zero()).then(|| self.start + Duration::from_millis(ms) + limit)
        };
        loop {
            let first = self.first.notified();
            let before_any_request = self.requests.load(Ordering::Relaxed) == 0;
            let idle = at(self.last.load(Ordering::Relaxed), limits.idle_timeout);
            let head = at(0, limits.header_read_timeout).filter(|_| before_any_request);
            let owed = self
                .oldest_owed()
                .and_then(|ms| at(ms, limits.idle_timeout));
            let now = Instant::now();
            if owed.is_some_and(|deadline| deadline <= now)
                || head.is_some_and(|deadline| deadline <= now)
                || (idle.is_some_and(|deadline| deadline <= now)
                    && self.waiting.load(Ordering::Relaxed) == 0)
            {
                return;
            }
            // An idle deadline passed while a request waits: look again one limit later.
            let idle = idle.map(|d| {
                if d > now {
                    d
                } else {
                    now + limits.idle_timeout
                }
            });
            let Some(next) = [idle, head, owed].into_iter().flatten().min() else {
                return std::future::pending().await;
            };
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = first => {}
            }
        }
    }
}

/// An [`Owed`] mark while hyper is waiting for the body, not the client for hyper.
const NOT_OWED: u64 = u64::MAX;

pin_project_lite::pin_project! {
    /// A response body of an h2 stream, marking on its connection's [`Activity`] since when the
    /// client owes it a read: from when it is handed to hyper, and after each frame, until hyper
    /// asks for the next one, which it does once the stream's window has room for it. (On
    /// HTTP/1 it marks nothing: hyper also waits for its whole write buffer to drain, which a slow
    /// but steady reader takes long for.)
    struct Owed<B> {
        #[pin]
        body: B,
        mark: Option<(Arc<AtomicU64>, Arc<Activity>)>,
    }
}

impl<B> Owed<B> {
    fn new(body: B, activity: Option<Arc<Activity>>) -> Owed<B> {
        let mark = activity.map(|activity| {
            let since = Arc::new(AtomicU64::new(activity.now()));
            let mut bodies = activity.bodies.lock().expect("bodies lock");
            // Marks of bodies gone are dropped as the list would grow: amortized O(1) a response.
            if bodies.len() == bodies.capacity() {
                bodies.retain(|b| b.strong_count() > 0);
            }
            bodies.push(Arc::downgrade(&since));
            drop(bodies);
            (since, activity)
        });
        Owed { body, mark }
    }
}

impl<B: Body> Body for Owed<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.body.poll_frame(cx);
        if let Some((since, activity)) = this.mark {
            let owed = match &polled {
                Poll::Ready(Some(_)) => activity.now(),
                _ => NOT_OWED,
            };
            since.store(owed, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A request waiting for its response head (counted until dropped).
struct Waiting(Arc<Activity>);

impl Waiting {
    fn new(activity: Arc<Activity>) -> Waiting {
        if activity.requests.fetch_add(1, Ordering::Relaxed) == 0 {
            activity.first.notify_waiters();
        }
        activity.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(activity)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.touch();
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's stream, noting on its [`Activity`] each time a byte moves.
struct Watched {
    io: Stream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
