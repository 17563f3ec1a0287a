//! A watcher on the raw bytes of a client connection that finds request heads carrying both
//! `Content-Length` and `Transfer-Encoding` (RFC 9112 §6.1), which hyper accepts (it drops the
//! length, reads the body as chunked and closes the connection afterwards) but which this proxy
//! answers with 400 and a close, as a smuggling defence. It only reads what passes; it never
//! changes or holds back a byte, and it never decides anything itself: the request handler asks
//! [`Framing::conflict_at`]. The stream it watches also tells HTTP/1 from an h2 preface
//! ([`Watched::poll_protocol`]), and hands the bytes it read for that out again first.
//!
//! To find each head it follows HTTP/1 framing the way hyper does (a `Content-Length` body, a
//! chunked body, or none), skipping body bytes without looking at them. It stops watching on an
//! h2 prior-knowledge preface, after a conflict (hyper closes the connection after that request
//! anyway), or on anything hyper would reject (hyper then answers 400 and closes itself). Other
//! framing errors — two different `Content-Length`s, whitespace before a colon — hyper already
//! answers with 400 and a close.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A head line longer than this is over hyper's head limit anyway; stop watching.
const MAX_LINE: usize = 64 * 1024;

/// What the watcher found, read by the request handler.
#[derive(Debug, Default)]
pub struct Framing {
    /// The 1-based number of the first head with conflicting framing; 0 when none.
    conflict: AtomicU64,
}

impl Framing {
    /// True when the `n`-th request (1-based) on this connection had conflicting framing.
    pub fn conflict_at(&self, n: u64) -> bool {
        self.conflict.load(Ordering::Acquire) == n
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between messages or inside a head.
    Head,
    /// `n` bytes of a `Content-Length` body left.
    Body(u64),
    /// A chunk-size line.
    ChunkSize,
    /// `n` bytes of chunk data left.
    ChunkData(u64),
    /// The line end after chunk data.
    ChunkEnd,
    /// Trailer lines until an empty one.
    Trailers,
    /// Not watching any more.
    Off,
}

/// Facts about the head being read.
#[derive(Debug, Default)]
struct Head {
    /// The request line has been read.
    started: bool,
    content_length: Option<u64>,
    /// A `Content-Length` field was present (parseable or not).
    content_length_seen: bool,
    /// A `Content-Length` was unparseable or disagreed with another.
    content_length_bad: bool,
    transfer_encoding: bool,
    chunked: bool,
}

/// The framing state machine over a byte stream.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    heads: u64,
    head: Head,
    line: Vec<u8>,
    first: bool,
    found: Arc<Framing>,
}

impl Scanner {
    pub fn new(found: Arc<Framing>) -> Self {
        Scanner {
            state: State::Head,
            heads: 0,
            head: Head::default(),
            line: Vec::new(),
            first: true,
            found,
        }
    }

    /// Follows `bytes`, the next bytes read from the client.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.state {
                State::Off => return,
                State::Body(left) | State::ChunkData(left) => {
                    let n = (left.min(bytes.len() as u64)) as usize;
                    bytes = &bytes[n..];
                    let left = left - n as u64;
                    self.state = match (self.state, left) {
                        (State::Body(_), 0) => State::Head,
                        (State::Body(_), l) => State::Body(l),
                        (_, 0) => State::ChunkEnd,
                        (_, l) => State::ChunkData(l),
                    };
                }
                State::Head | State::ChunkSize | State::ChunkEnd | State::Trailers => {
                    match memchr::memchr(b'\n', bytes) {
                        None => {
                            self.push_line(bytes);
                            return;
                        }
                        Some(i) if self.line.is_empty() => {
                            // The whole line is in this read: looked at where it is, not copied.
                            let line = &bytes[..i];
                            bytes = &bytes[i + 1..];
                            if line.len() > MAX_LINE {
                                self.state = State::Off;
                                return;
                            }
                            self.on_line(line.strip_suffix(b"\r").unwrap_or(line));
                        }
                        Some(i) => {
                            self.push_line(&bytes[..i]);
                            bytes = &bytes[i + 1..];
                            if self.state == State::Off {
                                return;
                            }
                            let mut line = std::mem::take(&mut self.line);
                            if line.last() == Some(&b'\r') {
                                line.pop();
                            }
                            self.on_line(&line);
                            line.clear();
                            self.line = line;
                        }
                    }
                }
            }
        }
    }

    fn push_line(&mut self, bytes: &[u8]) {
        if self.line.len() + bytes.len() > MAX_LINE {
            self.state = State::Off;
            self.line = Vec::new();
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    fn on_line(&mut self, line: &[u8]) {
        match self.state {
            State::Head => self.on_head_line(line),
            State::ChunkSize => {
                let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
                let size = std::str::from_utf8(&line[..digits])
                    .ok()
                    .and_then(|s| u64::from_str_radix(s, 16).ok());
                self.state = match size {
                    None => State::Off,
                    Some(0) => State::Trailers,
                    Some(n) => State::ChunkData(n),
                };
            }
            State::ChunkEnd => {
                self.state = if line.is_empty() {
                    State::ChunkSize
                } else {
                    State::Off
                };
            }
            State::Trailers => {
                if line.is_empty() {
                    self.state = State::Head;
                }
            }
            State::Body(_) | State::ChunkData(_) | State::Off => {}
        }
    }

    fn on_head_line(&mut self, line: &[u8]) {
        if !self.head.started {
            // hyper skips empty lines before a request line.
            if line.is_empty() {
                return;
            }
            if self.first && line == b"PRI * HTTP/2.0" {
                self.state = State::Off;
                return;
            }
            self.first = false;
            self.head.started = true;
            return;
        }
        if !line.is_empty() {
            self.on_field(line);
            return;
        }
        // End of the head: where does its body end?
        self.heads += 1;
        let head = std::mem::take(&mut self.head);
        // hyper ignores every Content-Length after a Transfer-Encoding without parsing it, so
        // any length beside a transfer coding is a conflict, whatever its value.
        if head.transfer_encoding && head.content_length_seen {
            self.found.conflict.store(self.heads, Ordering::Release);
            self.state = State::Off;
            return;
        }
        if head.content_length_bad {
            // hyper answers 400 and closes.
            self.state = State::Off;
            return;
        }
        self.state = match (head.content_length, head.transfer_encoding) {
            (Some(_), true) => {
                self.found.conflict.store(self.heads, Ordering::Release);
                State::Off
            }
            (None, true) if head.chunked => State::ChunkSize,
            // Not chunked last: hyper refuses the request and closes.
            (None, true) => State::Off,
            (Some(0), false) | (None, false) => State::Head,
            (Some(n), false) => State::Body(n),
        };
    }

    fn on_field(&mut self, line: &[u8]) {
        // Only two names matter, and hyper refuses a space before the colon: the colon is at
        // one of two places, and most lines are passed over without a search.
        const CL: &[u8] = b"content-length";
        const TE: &[u8] = b"transfer-encoding";
        let colon = if line.get(CL.len()) == Some(&b':') {
            CL.len()
        } else if line.get(TE.len()) == Some(&b':') {
            TE.len()
        } else {
            return;
        };
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.eq_ignore_ascii_case(CL) {
            self.head.content_length_seen = true;
            match (digits(value), self.head.content_length) {
                (Some(n), None) => self.head.content_length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                // Unparseable or different: decided at the end of the head.
                _ => self.head.content_length_bad = true,
            }
        } else if name.eq_ignore_ascii_case(TE) {
            self.head.transfer_encoding = true;
            // As hyper: the last line decides, and chunked must be the final coding.
            let last = value.rsplit(|&b| b == b',').next().map(trim).unwrap_or(&[]);
            self.head.chunked = last.eq_ignore_ascii_case(b"chunked");
        }
    }
}

/// A `Content-Length` value as hyper reads it: decimal digits only (no sign), no overflow.
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| match b {
        b'0'..=b'9' => n.checked_mul(10)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !matches!(c, b' ' | b'\t'))
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !matches!(c, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    &b[start..end]
}

/// A client stream with a [`Scanner`] watching what is read from it. Its first bytes are read
/// by [`Watched::poll_protocol`] to tell HTTP/1 from h2 prior knowledge, and handed out again
/// (to hyper, and to the scanner) before anything else is read.
pub struct Watched<S> {
    io: S,
    scanner: Scanner,
    /// The bytes read to tell the protocol: `pre[at..len]` are still to be handed out.
    pre: [u8; H2_PREFACE.len()],
    at: u8,
    len: u8,
}

/// What a connection's first bytes say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (h2c): the whole preface came.
    H2,
    /// The client closed the connection before its first bytes told.
    Closed,
}

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl<S> Watched<S> {
    pub fn new(io: S, found: Arc<Framing>) -> Self {
        Watched {
            io,
            scanner: Scanner::new(found),
            pre: [0; H2_PREFACE.len()],
            at: 0,
            len: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> Watched<S> {
    /// Reads until the first bytes tell the protocol: at the first byte that differs from the
    /// h2 preface, or once the whole preface came. Never reads past the preface's length.
    pub fn poll_protocol(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Protocol>> {
        loop {
            let from = usize::from(self.len);
            let mut buf = ReadBuf::new(&mut self.pre[from..]);
            std::task::ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
            let read = buf.filled().len();
            if read == 0 {
                return Poll::Ready(Ok(Protocol::Closed));
            }
            let to = from + read;
            self.len = to as u8;
            if self.pre[from..to] != H2_PREFACE[from..to] {
                return Poll::Ready(Ok(Protocol::Http1));
            }
            if to == H2_PREFACE.len() {
                return Poll::Ready(Ok(Protocol::H2));
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = if this.at < this.len {
            // The bytes read to tell the protocol, first.
            let pre = &this.pre[usize::from(this.at)..usize::from(this.len)];
            let n = pre.len().min(buf.remaining());
            buf.put_slice(&pre[..n]);
            this.at += n as u8;
            Poll::Ready(Ok(()))
        } else {
            Pin::new(&mut this.io).poll_read(cx, buf)
        };
        if let Poll::Ready(Ok(())) = polled
            && this.scanner.state != State::Off
        {
            this.scanner.feed(&buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns the conflicting head's number (0: none).
    fn scan(input: &[u8], step: usize) -> u64 {
        let found = Arc::new(Framing::default());
        let mut s = Scanner::new(found.clone());
        for piece in input.chunks(step) {
            s.feed(piece);
        }
        found.conflict.load(Ordering::Acquire)
    }

    fn every_split(input: &[u8]) -> Vec<u64> {
        (1..=input.len().min(64))
            .map(|step| scan(input, step))
            .collect()
    }

    #[test]
    fn content_length_with_transfer_encoding_is_found_in_any_order() {
        let a = b"POST /v1/x HTTP/1.1\r\nHost: l\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let b = b"POST /v1/x HTTP/1.1\r\nHost: l\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n";
        let c = b"POST /v1/x HTTP/1.1\r\nX-Content-Length: 5\r\nCONTENT-LENGTH:5\r\nTRANSFER-ENCODING:chunked\r\n\r\n0\r\n\r\n";
        assert!(every_split(a).iter().all(|&n| n == 1));
        assert!(every_split(b).iter().all(|&n| n == 1));
        assert!(every_split(c).iter().all(|&n| n == 1));
        // Names that only look alike are not the framing fields.
        let d = b"POST /v1/x HTTP/1.1\r\nX-Content-Length: 5\r\ntransfer-encodings: chunked\r\nContent-Lengths: 5\r\n\r\n";
        assert!(every_split(d).iter().all(|&n| n == 0));
    }

    #[test]
    fn later_requests_on_a_keep_alive_connection_are_followed_through_bodies() {
        let mut input = Vec::new();
        // A body that looks like a conflicting head must not be read as one.
        let body = b"X\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        input.extend_from_slice(
            format!(
                "\r\nPOST /a HTTP/1.1\r\nHost: l\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        input.extend_from_slice(body);
        input.extend_from_slice(b"POST /b HTTP/1.1\nHost: l\nTransfer-Encoding: gzip, chunked\n\n");
        input.extend_from_slice(b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n");
        input.extend_from_slice(b"GET /c HTTP/1.1\r\nHost: l\r\n\r\n");
        input.extend_from_slice(b"POST /d HTTP/1.1\r\nHost: l\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(
            every_split(&input).iter().all(|&n| n == 4),
            "{:?}",
            every_split(&input)
        );
    }

    #[test]
    fn content_length_values_are_read_as_hyper_reads_them() {
        assert_eq!(digits(b"0"), Some(0));
        assert_eq!(digits(b"1048576"), Some(1_048_576));
        assert_eq!(digits(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"+5",
            b"-1",
            b"5 ",
            b"0x10",
            b"18446744073709551616",
            b"1,1",
        ] {
            assert_eq!(digits(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn ordinary_requests_are_not_flagged() {
        let input = b"GET / HTTP/1.1\r\nHost: l\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc";
        assert!(every_split(input).iter().all(|&n| n == 0));
    }

    /// A client that sends `input` in pieces of `step` bytes, one per read, then closes.
    struct Pieces {
        input: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = self
                .step
                .min(buf.remaining())
                .min(self.input.len() - self.at);
            buf.put_slice(&self.input[self.at..self.at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    /// The protocol told by `input` sent in pieces of `step` bytes, what was left unread then,
    /// and what the connection then reads (in reads of at most 7 bytes), with what the watcher
    /// found.
    fn told(input: &[u8], step: usize) -> (Protocol, usize, Vec<u8>, u64) {
        let found = Arc::new(Framing::default());
        let pieces = Pieces {
            input: input.to_vec(),
            at: 0,
            step,
        };
        let mut w = Watched::new(pieces, found.clone());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let Poll::Ready(Ok(protocol)) = w.poll_protocol(&mut cx) else {
            panic!("a client that always has bytes tells at once");
        };
        let unread = input.len() - w.io.at;
        let mut read = Vec::new();
        loop {
            let mut space = [0u8; 7];
            let mut buf = ReadBuf::new(&mut space);
            assert!(Pin::new(&mut w).poll_read(&mut cx, &mut buf).is_ready());
            if buf.filled().is_empty() {
                break;
            }
            read.extend_from_slice(buf.filled());
        }
        (
            protocol,
            unread,
            read,
            found.conflict.load(Ordering::Acquire),
        )
    }

    #[test]
    fn the_first_bytes_tell_the_protocol_and_are_then_read_again_and_watched() {
        let conflicting = b"POST /v1/x HTTP/1.1\r\nHost: l\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let mut h2 = H2_PREFACE.to_vec();
        h2.extend_from_slice(b"\0\0\0\x04\0\0\0\0\0");
        let mut almost = H2_PREFACE[..16].to_vec();
        almost.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        for step in 1..=30 {
            let (p, unread, read, conflict) = told(conflicting, step);
            assert_eq!(p, Protocol::Http1, "step {step}");
            assert_eq!(read, conflicting, "every byte once, in order (step {step})");
            assert_eq!(
                conflict, 1,
                "the watcher saw the bytes read first (step {step})"
            );
            // `POST` differs from the preface at its second byte.
            let reads = conflicting.len() - step.clamp(2, 24);
            assert_eq!(unread, reads, "read up to the difference (step {step})");

            let (p, unread, read, conflict) = told(&h2, step);
            assert_eq!(p, Protocol::H2, "step {step}");
            assert_eq!(
                unread,
                h2.len() - 24,
                "nothing past the preface (step {step})"
            );
            assert_eq!((read, conflict), (h2.clone(), 0), "step {step}");

            let (p, _, read, _) = told(&almost, step);
            assert_eq!(
                p,
                Protocol::Http1,
                "a mismatch after part of a preface (step {step})"
            );
            assert_eq!(read, almost, "step {step}");

            let (p, _, read, _) = told(&H2_PREFACE[..20], step);
            assert_eq!((p, read.len()), (Protocol::Closed, 20), "step {step}");
        }
        assert_eq!(told(b"", 1).0, Protocol::Closed);
    }

    #[test]
    fn h2_prior_knowledge_is_not_watched() {
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        input.extend_from_slice(b"\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(scan(&input, 7), 0);
    }
}
