//! The bodies the proxy moves, frame by frame, never collected: the request body sent upstream
//! (streamed, with a tee keeping the chunks — reference-counted, not copied — of a small body so a
//! 401 can be replayed; or, when the body was whole in the first frame read, that frame alone),
//! the response body sent back (streamed, or one of the agent's own JSON
//! errors), and the idle timer both wrap. Nothing here buffers a response or copies a byte.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::timer::{Lazy, after_from};

use super::forward::RequestRecord;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// No frame for `after` while waiting on the other side: the body fails, so hyper aborts the
/// stream (the client connection, or the upstream request). The deadline is set when the body
/// first waits after a frame: a frame costs no clock read, a wait one, and a body that never
/// waits (a small one, whole in a frame) none.
pub struct Idle {
    after: Duration,
    /// `None` until the body waits; reset by each frame.
    deadline: Option<Instant>,
    timer: Lazy,
}

impl Idle {
    /// `Duration::ZERO` disables the timer.
    pub fn new(after: Duration) -> Self {
        Idle {
            after,
            deadline: None,
            timer: Lazy::default(),
        }
    }

    fn touch(&mut self) {
        self.deadline = None;
    }

    /// Call only when the wrapped body is pending: true once the gap exceeded the limit.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.after.is_zero() {
            return false;
        }
        let deadline = *self.deadline.get_or_insert_with(|| later(self.after));
        self.timer.poll_until(deadline, cx).is_ready()
    }

    fn error(&self, what: &str) -> BoxError {
        Box::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no {what} bytes for {} (proxy.idle_timeout)",
                humantime::format_duration(self.after)
            ),
        ))
    }
}

/// `now + after`, capped (see [`after_from`]).
fn later(after: Duration) -> Instant {
    after_from(Instant::now(), after)
}

/// Hands the kept chunks of a request body to the handler once the whole body went through and
/// fitted in the replay limit; dropping it (too big, trailers, an error) means "no replay".
struct Tee {
    kept: Vec<Bytes>,
    size: usize,
    limit: usize,
    done: oneshot::Sender<Vec<Bytes>>,
}

/// The request body as sent upstream. Small (48 bytes): the request that carries it is moved
/// through several futures and hyper's dispatch channel on every request.
pub enum UpstreamBody {
    /// No body (`GET`, `Content-Length: 0`).
    Empty,
    /// A body that was whole at hand: sent as one frame (and kept for a replay by a reference
    /// count, with no tee).
    Full(Option<Bytes>),
    /// The client's body, streamed as it arrives (boxed: the common small body is whole at hand).
    Stream(Box<Streamed>),
    /// A kept body sent again after a 401.
    Replay {
        chunks: std::vec::IntoIter<Bytes>,
        left: u64,
    },
}

pub struct Streamed {
    /// A frame taken from `inner` before streaming began, sent first.
    first: Option<Frame<Bytes>>,
    inner: Incoming,
    idle: Idle,
    tee: Option<Tee>,
}

/// What the handler holds to learn whether the body can be replayed.
pub type Kept = oneshot::Receiver<Vec<Bytes>>;

impl UpstreamBody {
    /// Streams `first` (a frame already taken from `inner`), then `inner`; with `keep_up_to`,
    /// also keeps their chunks for a replay while they fit.
    pub fn stream(
        first: Option<Frame<Bytes>>,
        inner: Incoming,
        idle: Duration,
        keep_up_to: Option<usize>,
    ) -> (Self, Option<Kept>) {
        let (tee, kept) = match keep_up_to {
            Some(limit) => {
                let (done, kept) = oneshot::channel();
                let tee = Tee {
                    kept: Vec::new(),
                    size: 0,
                    limit,
                    done,
                };
                (Some(tee), Some(kept))
            }
            None => (None, None),
        };
        let body = UpstreamBody::Stream(Box::new(Streamed {
            first,
            inner,
            idle: Idle::new(idle),
            tee,
        }));
        (body, kept)
    }

    pub fn replay(chunks: Vec<Bytes>) -> Self {
        let left = chunks.iter().map(|c| c.len() as u64).sum();
        UpstreamBody::Replay {
            chunks: chunks.into_iter(),
            left,
        }
    }
}

fn finish(tee: &mut Option<Tee>) {
    if let Some(t) = tee.take() {
        let _ = t.done.send(t.kept);
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Empty => Poll::Ready(None),
            UpstreamBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            UpstreamBody::Replay { chunks, left } => Poll::Ready(chunks.next().map(|c| {
                *left -= c.len() as u64;
                Ok(Frame::data(c))
            })),
            UpstreamBody::Stream(streamed) => {
                let Streamed {
                    first,
                    inner,
                    idle,
                    tee,
                } = &mut **streamed;
                let polled = match first.take() {
                    Some(frame) => Poll::Ready(Some(Ok(frame))),
                    None => Pin::new(&mut *inner).poll_frame(cx),
                };
                match polled {
                    Poll::Pending => {
                        if idle.poll_expired(cx) {
                            *tee = None;
                            return Poll::Ready(Some(Err(idle.error("request body"))));
                        }
                        Poll::Pending
                    }
                    Poll::Ready(None) => {
                        finish(tee);
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Err(e))) => {
                        *tee = None;
                        Poll::Ready(Some(Err(Box::new(e))))
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        idle.touch();
                        // Client trailers never carry credentials upstream (HTTP/2 forwards them).
                        let frame = match frame.into_trailers() {
                            Ok(mut trailers) => {
                                trailers.remove(http::header::AUTHORIZATION);
                                trailers.remove(http::header::PROXY_AUTHORIZATION);
                                Frame::trailers(trailers)
                            }
                            Err(frame) => frame,
                        };
                        if let Some(t) = tee {
                            match frame.data_ref() {
                                Some(data) if t.size + data.len() <= t.limit => {
                                    t.size += data.len();
                                    t.kept.push(data.clone());
                                }
                                // Too big to keep, or trailers (not replayed): no replay.
                                _ => *tee = None,
                            }
                        }
                        // hyper stops polling once `is_end_stream` says so: hand the copy over now.
                        if inner.is_end_stream() {
                            finish(tee);
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Full(data) => data.is_none(),
            UpstreamBody::Replay { left, chunks } => *left == 0 && chunks.len() == 0,
            UpstreamBody::Stream(s) => s.first.is_none() && s.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            UpstreamBody::Replay { left, .. } => SizeHint::with_exact(*left),
            UpstreamBody::Stream(s) => {
                // The length still to come includes the frame taken first.
                let mut hint = s.inner.size_hint();
                if let Some(n) = s
                    .first
                    .as_ref()
                    .and_then(|f| f.data_ref())
                    .map(|d| d.len() as u64)
                {
                    // Upper first: `set_lower` checks it stays below.
                    if let Some(upper) = hint.upper() {
                        hint.set_upper(upper.saturating_add(n));
                    }
                    hint.set_lower(hint.lower().saturating_add(n));
                }
                hint
            }
        }
    }
}

/// The response body sent to the client.
pub struct ResponseBody {
    kind: Kind,
    /// Logged and counted when the body ends or is dropped (client gone).
    record: Option<RequestRecord>,
}

enum Kind {
    /// One of the agent's own answers.
    Full(Option<Bytes>),
    /// The upstream's body, streamed.
    Stream { inner: Incoming, idle: Idle },
}

impl ResponseBody {
    pub fn full(bytes: Bytes, record: RequestRecord) -> Self {
        ResponseBody {
            kind: Kind::Full(Some(bytes)),
            record: Some(record),
        }
    }

    pub fn stream(inner: Incoming, idle: Duration, mut record: RequestRecord) -> Self {
        // An empty body may never be polled: it is complete already (its connection can go back).
        if inner.is_end_stream() {
            record.completed = true;
        }
        ResponseBody {
            kind: Kind::Stream {
                inner,
                idle: Idle::new(idle),
            },
            record: Some(record),
        }
    }

    fn count(&mut self, n: usize) {
        if let Some(r) = &mut self.record {
            r.bytes += n as u64;
        }
    }

    fn end(&mut self) {
        if let Some(mut r) = self.record.take() {
            r.completed = true;
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
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream { inner, idle } => match Pin::new(&mut *inner).poll_frame(cx) {
                Poll::Pending if idle.poll_expired(cx) => {
                    if let Some(r) = &this.record {
                        r.upstream_error("idle_timeout");
                    }
                    Poll::Ready(Some(Err(idle.error("response body"))))
                }
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    idle.touch();
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    if let Some(r) = &this.record {
                        r.upstream_error("reset");
                    }
                    Poll::Ready(Some(Err(Box::new(e) as BoxError)))
                }
                Poll::Ready(None) => Poll::Ready(None),
            },
        };
        match ready!(polled) {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    let n = d.len();
                    this.count(n);
                }
                if this.is_end_stream() {
                    this.end();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                // Dropping the record logs the request as cut short.
                this.record = None;
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.end();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Stream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Stream { inner, .. } => inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_timer_fires_only_after_a_full_gap() {
        let mut idle = Idle::new(Duration::from_secs(10));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(!idle.poll_expired(&mut cx));
        tokio::time::advance(Duration::from_secs(6)).await;
        // A frame, and the body waits again (as hyper polls it): the gap starts now.
        idle.touch();
        assert!(!idle.poll_expired(&mut cx));
        tokio::time::advance(Duration::from_secs(6)).await;
        // The first deadline passed, but a chunk came since: re-armed, not expired.
        assert!(!idle.poll_expired(&mut cx));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(!idle.poll_expired(&mut cx));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(idle.poll_expired(&mut cx));
    }

    /// A client that reads slowly keeps hyper from polling the response body; the time it spends
    /// so is not the upstream's silence.
    #[tokio::test(start_paused = true)]
    async fn the_gap_starts_when_the_body_waits_not_at_the_last_frame() {
        let mut idle = Idle::new(Duration::from_secs(10));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        idle.touch();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(!idle.poll_expired(&mut cx));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(idle.poll_expired(&mut cx));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_idle_timeout_never_fires() {
        let mut idle = Idle::new(Duration::ZERO);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(!idle.poll_expired(&mut cx));
    }

    #[test]
    fn replay_body_yields_the_kept_chunks_with_an_exact_size() {
        let body = UpstreamBody::replay(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"c")]);
        assert_eq!(body.size_hint().exact(), Some(3));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut body = std::pin::pin!(body);
        let mut got = Vec::new();
        while let Poll::Ready(Some(Ok(f))) = body.as_mut().poll_frame(&mut cx) {
            got.extend_from_slice(f.data_ref().unwrap());
        }
        assert_eq!(got, b"abc");
        assert!(body.is_end_stream());
    }
}
