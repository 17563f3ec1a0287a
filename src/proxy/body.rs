//! The response body sent to the client, and the [`Record`] of its request: the upstream's body
//! passed on frame by frame as it comes (never buffered), observed on its way for the counters,
//! the metrics and the request's log line, which are written when the body ends or is dropped
//! (the client went away), so they cover the whole stream. [`Idle`] bounds the gap between two
//! frames of a body, either way.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::time::Instant;
use tokio::time::Sleep;

use super::Counters;
use super::upstream::Lease;
use crate::usage::{Accounting, Entry, Meter};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// nginx's "client closed request": the client went away before a response was chosen.
const CLIENT_CLOSED: u16 = 499;

/// One request's place in the counters and its debug line, written when dropped.
pub struct Record {
    counters: Arc<Counters>,
    start: Instant,
    /// [`CLIENT_CLOSED`] until a response is chosen.
    status: u16,
    /// A `text/event-stream` response (counted in the streams gauge).
    stream: bool,
    bytes: u64,
    completed: bool,
    /// What the debug line names, kept only when that line is written. Copied: a part of the
    /// request kept for the whole response would keep the connection's read buffer too.
    logged: Option<Logged>,
    /// An accounted request's ledger line in the making (boxed: most requests are not).
    account: Option<Box<Account>>,
}

/// What an accounted request's counts and ledger line need, and the meter reading its response.
pub struct Account {
    pub accounting: Arc<Accounting>,
    pub session: String,
    /// The profile the request went with.
    pub profile: Arc<str>,
    pub path: String,
    pub request_id: String,
    /// The request's own `model`, for a response that names none.
    pub model: Option<String>,
    meter: Option<Meter>,
}

impl Account {
    pub fn new(
        accounting: Arc<Accounting>,
        session: String,
        profile: Arc<str>,
        path: String,
        request_id: String,
    ) -> Account {
        Account {
            accounting,
            session,
            profile,
            path,
            request_id,
            model: None,
            meter: None,
        }
    }
}

struct Logged {
    method: Method,
    /// Only the path is logged, never the query.
    path: String,
    session: String,
}

impl Record {
    pub fn new(counters: Arc<Counters>, req: &Request<Incoming>) -> Record {
        counters.stats.requests.fetch_add(1, Ordering::Relaxed);
        counters.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = counters.metrics.get() {
            m.in_flight_requests.inc();
        }
        let logged = tracing::enabled!(tracing::Level::DEBUG).then(|| Logged {
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            session: "-".to_string(),
        });
        Record {
            counters,
            start: Instant::now(),
            status: CLIENT_CLOSED,
            stream: false,
            bytes: 0,
            completed: false,
            logged,
            account: None,
        }
    }

    /// Accounts this request's response (SPEC §8) when it ends.
    pub fn account(&mut self, account: Account) {
        self.account = Some(Box::new(account));
    }

    /// The request's model, when its body was read.
    pub fn request_model(&mut self, model: Option<String>) {
        if let Some(a) = &mut self.account {
            a.model = model;
        }
    }

    /// An accounted request's upstream response: its usage is read as its body passes.
    pub fn meter(&mut self, status: StatusCode, headers: &http::HeaderMap, length: Option<u64>) {
        if let Some(a) = &mut self.account
            && status.is_success()
        {
            a.meter = Meter::new(headers.get(http::header::CONTENT_TYPE), length);
        }
    }

    /// The session the request goes upstream with, for the debug line.
    pub fn session(&mut self, session: Option<&HeaderValue>) {
        if let (Some(logged), Some(s)) = (&mut self.logged, session) {
            logged.session = String::from_utf8_lossy(s.as_bytes()).into_owned();
        }
    }

    /// The response head is chosen.
    pub fn responded(&mut self, status: StatusCode, stream: bool) {
        self.status = status.as_u16();
        self.counters.stats.count_status(status);
        if stream && let Some(m) = self.counters.metrics.get() {
            self.stream = true;
            m.in_flight_streams.inc();
        }
    }

    /// The upstream failed (`kind`: `unreachable`, `timeout`, `reset`, `idle_timeout`).
    pub fn upstream_error(&self, kind: &str) {
        let counters = &self.counters;
        counters
            .stats
            .upstream_errors
            .fetch_add(1, Ordering::Relaxed);
        if let Some(m) = counters.metrics.get() {
            m.upstream_error(kind);
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        if let Some(a) = self.account.take() {
            let read = a.meter.map(Meter::finish).unwrap_or_default();
            a.accounting.record(Entry {
                session: a.session,
                profile: a.profile,
                model: read.model.or(a.model),
                path: a.path,
                status: self.status,
                tokens: read.tokens,
                duration: elapsed,
                request_id: a.request_id,
            });
        }
        self.counters
            .stats
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
        if let Some(m) = self.counters.metrics.get() {
            m.proxy_response(self.status, elapsed);
            m.in_flight_requests.dec();
            if self.stream {
                m.in_flight_streams.dec();
            }
        }
        if let Some(Logged {
            method,
            path,
            session,
        }) = &self.logged
        {
            tracing::debug!(
                %method,
                path,
                status = self.status,
                bytes = self.bytes,
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                session,
                completed = self.completed,
                "proxied request"
            );
        }
    }
}

/// The body of a response to the client: the agent's own answer, or the upstream's body
/// (bounded by `idle_timeout` between frames) with the request's record.
pub enum ResponseBody {
    Full(Full<Bytes>),
    Upstream {
        body: Pin<Box<Idle<Incoming>>>,
        record: Record,
        /// The HTTP/1.1 connection it comes on, given back once the body was read to its end.
        lease: Option<Lease>,
    },
}

impl ResponseBody {
    pub fn full(bytes: Bytes) -> ResponseBody {
        ResponseBody::Full(Full::new(bytes))
    }

    pub fn upstream(
        body: Idle<Incoming>,
        mut record: Record,
        lease: Option<Lease>,
    ) -> ResponseBody {
        // An empty body may never be polled: it is complete already.
        let mut lease = lease;
        if body.is_end_stream() {
            record.completed = true;
            if let Some(lease) = lease.take() {
                lease.release();
            }
        }
        ResponseBody::Upstream {
            body: Box::pin(body),
            record,
            lease,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Full(full) => Pin::new(full).poll_frame(cx).map_err(|e| match e {}),
            ResponseBody::Upstream {
                body,
                record,
                lease,
            } => {
                let polled = body.as_mut().poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            record.bytes += data.len() as u64;
                            if let Some(meter) =
                                record.account.as_mut().and_then(|a| a.meter.as_mut())
                            {
                                meter.feed(data);
                            }
                        }
                        record.completed = body.is_end_stream();
                    }
                    Poll::Ready(Some(Err(e))) => {
                        let kind = if e.is::<IdleTimeout>() {
                            "idle_timeout"
                        } else {
                            "reset"
                        };
                        record.upstream_error(kind);
                    }
                    Poll::Ready(None) => record.completed = true,
                    Poll::Pending => {}
                }
                if record.completed
                    && let Some(lease) = lease.take()
                {
                    lease.release();
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full(full) => full.is_end_stream(),
            ResponseBody::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(full) => full.size_hint(),
            ResponseBody::Upstream { body, .. } => body.size_hint(),
        }
    }
}

pin_project_lite::pin_project! {
    /// A body that fails with [`IdleTimeout`] when no frame comes for `timeout` while it is being
    /// read: the gap starts when the reader waits, not at the last frame. (tower-http's
    /// `TimeoutBody` does the same but hides the body's size, which would turn every response
    /// into a chunked one.)
    pub struct Idle<B> {
        #[pin]
        body: B,
        timeout: Duration,
        #[pin]
        sleep: Option<Sleep>,
    }
}

impl<B> Idle<B> {
    /// `timeout` of `Duration::MAX`: no limit.
    pub fn new(timeout: Duration, body: B) -> Idle<B> {
        Idle {
            body,
            timeout,
            sleep: None,
        }
    }
}

impl<B: Body<Error: Into<BoxError>>> Body for Idle<B> {
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let mut this = self.project();
        if let Poll::Ready(frame) = this.body.poll_frame(cx) {
            this.sleep.set(None);
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.sleep.is_none() {
            this.sleep.set(Some(tokio::time::sleep(*this.timeout)));
        }
        let sleep = this.sleep.as_pin_mut().expect("set above");
        sleep
            .poll(cx)
            .map(|()| Some(Err(Box::new(IdleTimeout) as BoxError)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// No frame of a body came within `proxy.idle_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("no data for longer than proxy.idle_timeout")]
pub struct IdleTimeout;

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body that never yields.
    struct Silent;

    impl Body for Silent {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_silent_for_the_idle_timeout_fails_and_not_before() {
        let start = Instant::now();
        let mut body = std::pin::pin!(Idle::new(Duration::from_secs(5), Silent));
        let e = body.frame().await.unwrap().unwrap_err();
        assert!(e.is::<IdleTimeout>());
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_with_frames_keeps_its_size_and_ends() {
        let mut body = std::pin::pin!(Idle::new(
            Duration::MAX,
            Full::new(Bytes::from_static(b"abc"))
        ));
        assert_eq!(body.size_hint().exact(), Some(3));
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "abc"
        );
        assert!(body.is_end_stream());
    }
}
