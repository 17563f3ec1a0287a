//! The echo upstream: an in-process, OpenAI-compatible stand-in for Behest that `behest-agent dev`,
//! the tests and the benchmark put behind the proxy.
//!
//! It checks bearer tokens as Behest does — a JWT signed by one of the IdP's keys ([`Keys`]: an
//! embedded IdP's, or a JWKS fetched over HTTP), for the configured audience, not expired, carrying
//! `uid`, `tid` and `pid` — and answers anything else with OpenAI's 401 `invalid_api_key`. With no
//! keys it runs in fast mode for the benchmark: any bearer but the `placeholder` a job's
//! environment carries is taken.
//!
//! It is served as a hyper service ([`Upstream::service`]); the address it is built with is the
//! base URL the agent is pointed at.
//!
//! Endpoints (any path prefix before `/v1/` is accepted and recorded, so an upstream base URL with a
//! path can be tested): `GET /v1/models` and `/v1/models/{id}`; `POST /v1/chat/completions`, echoing
//! the last user message, as one JSON object or, with `"stream": true`, as server-sent events each
//! written as its own body frame, [`UpstreamOptions::sse_interval`] apart (`x-echo-events: N` sets
//! the number of content pieces, default 5); `POST /v1/embeddings` (8 deterministic floats per
//! input, `encoding_format` `float` or `base64`); `POST /v1/responses` (the Responses API, JSON or
//! streamed, with `usage`); `POST /v1/files`, whose multipart body is digested
//! as it streams in, never buffered. Anything else is an OpenAI-shaped 404. Every answer carries
//! `x-request-id: req_N`, N the request's number from 0, as OpenAI's carry a request id.
//!
//! Tests steer it with [`UpstreamFault`]s — one-shot ([`Upstream::fail_next`]) or persistent
//! ([`Upstream::set_fault`]) — and read what it received ([`Upstream::requests`]) and its counters,
//! connections included when each accepted connection is served by
//! [`UpstreamService::for_connection`].
//! It never records or logs a token: the `Authorization` header is kept only as a [`BearerKind`].
//!
//! Layout: `verify` (the bearer check and where its keys come from) · this file (options, faults,
//! routing, the record, the OpenAI-shaped answers, SSE, the streaming multipart digest).

mod verify;

pub use verify::Keys;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use aws_lc_rs::digest;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use serde_json::{Map, Value, json};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::idp::Idp;
use crate::{BoxError, Now};
use verify::Verifier;

/// The bearer a job's environment carries before the agent replaces it (`behest-agent env`).
pub const PLACEHOLDER_KEY: &str = "placeholder";
/// The models `GET /v1/models` lists.
pub const MODELS: [&str; 2] = ["echo-1", "embed-1"];
/// Length of every embedding vector.
pub const EMBEDDING_DIMENSIONS: usize = 8;
/// Content pieces a streamed completion has when the request sends no `x-echo-events`.
pub const DEFAULT_EVENTS: usize = 5;
/// Request header that sets the number of content pieces of a streamed completion.
pub const EVENTS_HEADER: &str = "x-echo-events";

/// Bound on `x-echo-events`, so a typo cannot keep a stream open for days.
const MAX_EVENTS: usize = 1_000_000;
/// JSON request bodies (chat, embeddings) are read whole up to this; larger ones get 413.
const MAX_JSON_BODY: usize = 8 * 1024 * 1024;
/// Requests kept for [`Upstream::requests`]; older ones are forgotten so a benchmark's millions
/// of requests do not grow memory without bound.
const RECORD_LIMIT: usize = 10_000;

/// Every response body: streamed frames, so SSE events leave one by one.
type Body = UnsyncBoxBody<Bytes, io::Error>;

/// How the upstream checks tokens and paces streams.
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    /// The IdP's public keys; `None` is fast mode, which only checks that a real bearer is present.
    pub keys: Option<Keys>,
    /// The `iss` tokens must carry, when set (trailing slashes are ignored).
    pub issuer: Option<String>,
    /// The `aud` tokens must carry.
    pub audience: String,
    /// What `exp` is checked against and SSE send times are read from.
    pub now: Now,
    /// Pause between two SSE events of a streamed completion (none before the first).
    pub sse_interval: Duration,
}

impl UpstreamOptions {
    /// Fast mode (no signature or claim checks), the system clock, 20 ms between SSE events.
    pub fn new(audience: impl Into<String>) -> Self {
        Self {
            keys: None,
            issuer: None,
            audience: audience.into(),
            now: Now::system(),
            sse_interval: Duration::from_millis(20),
        }
    }

    /// Verifies tokens against an embedded IdP's keys and issuer, as Behest verifies Auth0's.
    pub fn for_idp(idp: &Idp, audience: impl Into<String>) -> Self {
        Self {
            keys: Some(Keys::Idp(idp.clone())),
            issuer: Some(idp.issuer()),
            ..Self::new(audience)
        }
    }
}

/// A misbehaviour to inject. A fault is taken when a request arrives (whatever its path) and acts
/// once the request body has been read and recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamFault {
    /// 401 `invalid_api_key` whatever the token (Behest after a key rotation, a revoked client…).
    Unauthorized,
    /// This status with an OpenAI-shaped `server_error` body (500, 502, 503…).
    Status(u16),
    /// Waits this long before answering normally (tokio time, so a paused test clock drives it).
    SlowHeaders(Duration),
    /// Answers normally but aborts the body after this many SSE events (for a non-streamed answer,
    /// after half the JSON): no terminating chunk, the connection is reset.
    DropStream { after_events: usize },
    /// Answers normally, but a streamed answer stops after this many SSE events and sends nothing
    /// more until [`Upstream::resume_stream`] lets it go on to its end — or never, for a stream
    /// that goes silent; it is cut when the service's shutdown token is cancelled. A JSON answer
    /// is not affected.
    PauseStream { after_events: usize },
    /// Never answers; the request stays in flight until the client goes away (counted in
    /// [`Upstream::cancelled`]) or the service's shutdown token is cancelled (then 503).
    Hold,
    /// 200 with this content type and body, sent in one piece (malformed usage, huge lines…).
    Raw { content_type: String, body: Bytes },
    /// Answers `101 Switching Protocols` (`Upgrade: websocket`) whatever the request asked, as a
    /// confused or hostile server might; the connection then closes.
    SwitchProtocols,
}

/// What the `Authorization` header carried; the token itself is never kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BearerKind {
    /// No `Authorization: Bearer …` header (or an empty token).
    Missing,
    /// Literally [`PLACEHOLDER_KEY`]: the agent did not replace the job's key.
    Placeholder,
    /// Something that is not a JWT.
    Opaque,
    /// Three dot-separated parts, whether or not it verified.
    Jwt,
}

/// The file part of a `POST /v1/files` upload, digested as it streamed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub filename: Option<String>,
    /// The multipart `purpose` field, when sent.
    pub purpose: Option<String>,
    /// Length of the file content (not of the whole multipart body).
    pub bytes: u64,
    /// Lowercase hex SHA-256 of the file content.
    pub sha256: String,
}

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2.0`…
    pub version: String,
    /// Every header in arrival order, names lowercase; `Authorization` and `Proxy-Authorization`
    /// values are replaced by `<redacted>`.
    pub headers: Vec<(String, String)>,
    /// The trailer fields of a chunked body, redacted as `headers` are.
    pub trailers: Vec<(String, String)>,
    pub bearer: BearerKind,
    /// The bearer's claims, when it verified (never in fast mode).
    pub claims: Option<Value>,
    /// The whole request body: its length and lowercase hex SHA-256.
    pub body_len: u64,
    pub body_sha256: String,
    /// The file part of a multipart upload to `/v1/files`.
    pub upload: Option<Upload>,
    /// `X-Session-Id`, when sent.
    pub session_id: Option<String>,
    /// The status answered; `None` while the answer is held back.
    pub status: Option<u16>,
    /// When each SSE event of a streamed answer was handed to the connection.
    pub sse_sent_at: Vec<SystemTime>,
}

impl Recorded {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (lowercase), in order.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A handle on an echo upstream; clones share state.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` in fast mode.
    verifier: Option<Verifier>,
    now: Now,
    sse_interval: Duration,
    /// `http://ADDRESS`, where it is reached.
    base_url: String,
    faults: Mutex<Faults>,
    log: Mutex<Log>,
    /// Requests received, whatever became of them.
    requests: AtomicU64,
    /// Requests whose response has not ended (a stream counts until its last event).
    in_flight: AtomicU64,
    /// Responses abandoned because the client went away before their body ended.
    cancelled: AtomicU64,
    /// Connections served by [`UpstreamService::for_connection`].
    connections: AtomicU64,
    /// One permit per [`Upstream::resume_stream`], taken by a stream paused by
    /// [`UpstreamFault::PauseStream`]; a permit given before the stream pauses waits for it.
    resumes: Semaphore,
    /// Bumped on every change a test may wait for ([`Upstream::wait_for`]).
    changes: watch::Sender<u64>,
}

#[derive(Default)]
struct Faults {
    /// One-shot faults in the order they will be taken.
    queued: VecDeque<UpstreamFault>,
    persistent: Option<UpstreamFault>,
}

/// The last [`RECORD_LIMIT`] requests, addressed by a sequence number that survives eviction.
#[derive(Default)]
struct Log {
    /// Sequence number of `entries[0]`.
    first: u64,
    entries: VecDeque<Recorded>,
}

impl Log {
    fn push(&mut self, recorded: Recorded) -> u64 {
        if self.entries.len() == RECORD_LIMIT {
            self.entries.pop_front();
            self.first += 1;
        }
        self.entries.push_back(recorded);
        self.first + self.entries.len() as u64 - 1
    }

    fn get_mut(&mut self, seq: u64) -> Option<&mut Recorded> {
        let index = seq.checked_sub(self.first)?;
        self.entries.get_mut(usize::try_from(index).ok()?)
    }
}

impl Upstream {
    /// An upstream to be reached at `addr`, the address of the listener that will serve
    /// [`Upstream::service`].
    pub fn new(addr: SocketAddr, opts: UpstreamOptions) -> Upstream {
        let verifier = opts
            .keys
            .map(|keys| Verifier::new(keys, opts.issuer, opts.audience, opts.now.clone()));
        Upstream {
            inner: Arc::new(Inner {
                verifier,
                now: opts.now,
                sse_interval: opts.sse_interval,
                base_url: format!("http://{addr}"),
                faults: Mutex::default(),
                log: Mutex::default(),
                requests: AtomicU64::new(0),
                in_flight: AtomicU64::new(0),
                cancelled: AtomicU64::new(0),
                connections: AtomicU64::new(0),
                resumes: Semaphore::new(0),
                changes: watch::Sender::new(0),
            }),
        }
    }

    /// The upstream as a hyper service, to serve on the listener bound at its address (or to call
    /// directly with a request). Requests held by [`UpstreamFault::Hold`] are answered 503 once
    /// `shutdown` is cancelled, so a server draining its connections is not kept waiting.
    pub fn service(&self, shutdown: CancellationToken) -> UpstreamService {
        UpstreamService {
            upstream: self.clone(),
            shutdown,
        }
    }

    /// `http://ADDRESS`, without a trailing slash (append `/v1` for an OpenAI base URL).
    pub fn base_url(&self) -> String {
        self.inner.base_url.clone()
    }

    /// Queues `fault` for the next `n` requests, after faults already queued.
    pub fn fail_next(&self, n: u32, fault: UpstreamFault) {
        lock(&self.inner.faults)
            .queued
            .extend(std::iter::repeat_n(fault, n as usize));
    }

    /// Applies `fault` to every request no queued fault takes, until replaced or cleared (`None`).
    pub fn set_fault(&self, fault: Option<UpstreamFault>) {
        lock(&self.inner.faults).persistent = fault;
    }

    /// The requests received (the last 10,000), oldest first; a request appears once its body has
    /// been read.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.inner.log).entries.iter().cloned().collect()
    }

    /// Requests received, whatever became of them.
    pub fn request_count(&self) -> u64 {
        self.inner.requests.load(Ordering::SeqCst)
    }

    /// Requests whose response has not ended yet (a stream counts until its last event).
    pub fn in_flight(&self) -> u64 {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// Responses abandoned because the client went away before the body ended (or before the
    /// head was sent, as with [`UpstreamFault::Hold`]).
    pub fn cancelled(&self) -> u64 {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    /// Connections served so far by [`UpstreamService::for_connection`].
    pub fn connections(&self) -> u64 {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// Lets one stream paused by [`UpstreamFault::PauseStream`] go on to its end: the first one
    /// paused, or, when none is paused yet, the next one to pause.
    pub fn resume_stream(&self) {
        self.inner.resumes.add_permits(1);
    }

    /// Returns once `done(self)` holds, re-checking after each change in what the upstream saw
    /// (a request arriving, being recorded, an SSE event, a response ending). Lets a test wait for
    /// "the upstream holds the request" or "the stream was cancelled" without sleeping. Wrap it in
    /// a timeout: it waits forever if the condition never holds.
    pub async fn wait_for(&self, done: impl Fn(&Upstream) -> bool) {
        let mut changes = self.inner.changes.subscribe();
        while !done(self) {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    fn changed(&self) {
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn take_fault(&self) -> Option<UpstreamFault> {
        let mut faults = lock(&self.inner.faults);
        faults
            .queued
            .pop_front()
            .or_else(|| faults.persistent.clone())
    }

    fn update(&self, seq: u64, edit: impl FnOnce(&mut Recorded)) {
        if let Some(recorded) = lock(&self.inner.log).get_mut(seq) {
            edit(recorded);
        }
        self.changed();
    }

    async fn handle<B>(&self, request: Request<B>, shutdown: CancellationToken) -> Response<Body>
    where
        B: HttpBody<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        self.inner.requests.fetch_add(1, Ordering::SeqCst);
        let in_flight = InFlight::start(self.clone());
        // Taken on arrival, so a queued fault is used up whatever this request turns out to be.
        let fault = self.take_fault();

        let (parts, body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        let route = Route::of(&parts.method, parts.uri.path());
        let sink = match route {
            Route::Chat | Route::Embeddings | Route::Responses => Sink::Json(Vec::new()),
            Route::Files => multipart_boundary(&parts.headers)
                .map_or(Sink::NotMultipart, |boundary| {
                    Sink::Multipart(Box::new(Multipart::new(&boundary)))
                }),
            _ => Sink::Discard,
        };
        let read = read_body(body, sink).await;
        let (bearer, verdict) = self.authenticate(&parts.headers).await;

        let seq = lock(&self.inner.log).push(Recorded {
            method: parts.method.to_string(),
            path,
            version: format!("{:?}", parts.version),
            headers: recorded_headers(&parts.headers),
            trailers: read.trailers.clone(),
            bearer,
            claims: verdict.as_ref().ok().cloned().flatten(),
            body_len: read.len,
            body_sha256: read.sha256.clone(),
            upload: match &read.sink {
                Sink::Multipart(m) => m.upload(),
                _ => None,
            },
            session_id: header_str(&parts.headers, "x-session-id").map(str::to_owned),
            status: None,
            sse_sent_at: Vec::new(),
        });
        self.changed();

        let mut stream_fault = None;
        match fault {
            Some(UpstreamFault::Unauthorized) => {
                let response = invalid_api_key(
                    "The API key was revoked (fault injected by the echo upstream).",
                );
                return self.finish(seq, in_flight, response);
            }
            Some(UpstreamFault::Status(code)) => {
                let status =
                    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let response = openai_error(
                    status,
                    &format!(
                        "The server had an error processing your request (fault: HTTP {code})."
                    ),
                    "server_error",
                    None,
                );
                return self.finish(seq, in_flight, response);
            }
            Some(UpstreamFault::Raw { content_type, body }) => {
                let response = Response::builder()
                    .header(CONTENT_TYPE, content_type)
                    .body(full(body))
                    .expect("a raw response builds");
                return self.finish(seq, in_flight, response);
            }
            Some(UpstreamFault::SlowHeaders(delay)) => tokio::time::sleep(delay).await,
            Some(UpstreamFault::DropStream { after_events }) => {
                stream_fault = Some(StreamFault::Drop(after_events));
            }
            Some(UpstreamFault::PauseStream { after_events }) => {
                stream_fault = Some(StreamFault::Pause(after_events));
            }
            Some(UpstreamFault::SwitchProtocols) => {
                let response = Response::builder()
                    .status(StatusCode::SWITCHING_PROTOCOLS)
                    .header(http::header::CONNECTION, "upgrade")
                    .header(http::header::UPGRADE, "websocket")
                    .body(full(Bytes::new()))
                    .expect("a valid response head");
                return self.finish(seq, in_flight, response);
            }
            Some(UpstreamFault::Hold) => {
                // Dropped with `in_flight` when the client goes away: that is the cancellation.
                shutdown.cancelled().await;
                let response = openai_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The echo upstream is shutting down.",
                    "server_error",
                    None,
                );
                return self.finish(seq, in_flight, response);
            }
            None => {}
        }

        if let Err(reason) = verdict {
            return self.finish(seq, in_flight, invalid_api_key(&reason));
        }
        if let Some(failure) = read.failure() {
            return self.finish(seq, in_flight, failure);
        }

        let answer = self.answer(route, &read, &parts, seq);
        match answer {
            Answer::Error(response) => self.finish(seq, in_flight, response),
            Answer::Json(status, value) => {
                let bytes = Bytes::from(value.to_string());
                let body = match stream_fault {
                    Some(StreamFault::Drop(_)) => truncated_body(bytes),
                    Some(StreamFault::Pause(_)) | None => full(bytes),
                };
                let response = with_json_type(Response::builder().status(status), body);
                self.finish(seq, in_flight, response)
            }
            Answer::Stream(events) => {
                self.update(seq, |r| r.status = Some(200));
                let body = self.sse_body(events, stream_fault, seq, in_flight, shutdown);
                Response::builder()
                    .header(CONTENT_TYPE, "text/event-stream")
                    .header(http::header::CACHE_CONTROL, "no-cache")
                    .header("x-request-id", format!("req_{seq}"))
                    .body(body)
                    .expect("a valid response head")
            }
        }
    }

    /// The echo's answer to a request that passed the checks.
    fn answer(
        &self,
        route: Route,
        read: &BodyRead,
        parts: &http::request::Parts,
        seq: u64,
    ) -> Answer {
        match route {
            Route::Models => Answer::Json(StatusCode::OK, models()),
            Route::Model(id) if MODELS.contains(&id.as_str()) => {
                Answer::Json(StatusCode::OK, model(&id))
            }
            Route::Model(id) => Answer::Error(openai_error(
                StatusCode::NOT_FOUND,
                &format!("The model `{id}` does not exist or you do not have access to it."),
                "invalid_request_error",
                Some("model_not_found"),
            )),
            Route::Chat => self.chat(&read.sink, &parts.headers, seq),
            Route::Embeddings => embeddings(&read.sink),
            Route::Responses => self.responses(&read.sink, &parts.headers, seq),
            Route::Files => self.file(&read.sink, read.len),
            Route::NotFound => Answer::Error(openai_error(
                StatusCode::NOT_FOUND,
                &format!("Invalid URL ({} {})", parts.method, parts.uri.path()),
                "invalid_request_error",
                Some("unknown_url"),
            )),
        }
    }

    /// Records the status of a response whose body is already complete and ends its in-flight span.
    fn finish(
        &self,
        seq: u64,
        mut in_flight: InFlight,
        mut response: Response<Body>,
    ) -> Response<Body> {
        let status = response.status().as_u16();
        if let Ok(value) = HeaderValue::try_from(format!("req_{seq}")) {
            response.headers_mut().insert("x-request-id", value);
        }
        self.update(seq, |r| r.status = Some(status));
        in_flight.complete();
        response
    }

    /// Checks the bearer as Behest does; `Ok(claims)` when accepted (no claims in fast mode),
    /// `Err(reason)` for the 401's message.
    async fn authenticate(
        &self,
        headers: &HeaderMap,
    ) -> (BearerKind, Result<Option<Value>, String>) {
        let token = header_str(headers, AUTHORIZATION.as_str())
            .and_then(|value| {
                let (scheme, token) = value.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|token| !token.is_empty());
        let Some(token) = token else {
            return (
                BearerKind::Missing,
                Err("You didn't provide an API key. You need to provide it in an Authorization: Bearer header.".to_owned()),
            );
        };
        let kind = if token == PLACEHOLDER_KEY {
            BearerKind::Placeholder
        } else if token.split('.').count() == 3 {
            BearerKind::Jwt
        } else {
            BearerKind::Opaque
        };
        if kind == BearerKind::Placeholder {
            return (
                kind,
                Err("Incorrect API key provided: the placeholder key reached the upstream; the agent should have replaced it.".to_owned()),
            );
        }
        let Some(verifier) = &self.inner.verifier else {
            return (kind, Ok(None));
        };
        let verdict = match verifier.check(token).await {
            Ok(claims) => Ok(Some(Value::Object(claims))),
            Err(refusal) => Err(format!("Invalid bearer token: {refusal}.")),
        };
        (kind, verdict)
    }

    fn chat(&self, sink: &Sink, headers: &HeaderMap, seq: u64) -> Answer {
        let request = match json_request(sink) {
            Ok(request) => request,
            Err(answer) => return *answer,
        };
        let Some(messages) = request.get("messages").and_then(Value::as_array) else {
            return Answer::Error(openai_error(
                StatusCode::BAD_REQUEST,
                "Missing required parameter: 'messages'.",
                "invalid_request_error",
                Some("missing_required_parameter"),
            ));
        };
        let reply = messages
            .iter()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
            .map(|m| message_text(m.get("content")))
            .unwrap_or_default();
        let prompt_tokens: u64 = messages
            .iter()
            .map(|m| words(&message_text(m.get("content"))))
            .sum();
        let usage = usage(prompt_tokens, words(&reply));
        let model = request
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or(MODELS[0])
            .to_owned();
        let id = format!("chatcmpl-echo{seq}");
        let created = self.inner.now.unix();

        if request.get("stream").and_then(Value::as_bool) != Some(true) {
            return Answer::Json(
                StatusCode::OK,
                json!({
                    "id": id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": reply, "refusal": null},
                        "logprobs": null,
                        "finish_reason": "stop",
                    }],
                    "usage": usage,
                }),
            );
        }

        let pieces = header_str(headers, EVENTS_HEADER)
            .and_then(|n| n.trim().parse::<usize>().ok())
            .unwrap_or(DEFAULT_EVENTS)
            .clamp(1, MAX_EVENTS);
        let include_usage = request
            .get("stream_options")
            .and_then(|options| options.get("include_usage"))
            .and_then(Value::as_bool)
            == Some(true);
        Answer::Stream(SseEvents::Chat(ChatEvents {
            chunk: ChunkTemplate { id, created, model },
            reply: reply.chars().collect(),
            pieces,
            usage: include_usage.then_some(usage),
            next: 0,
        }))
    }

    /// The Responses API: echoes `input` (a string, or the last user message), as one response
    /// object or, with `"stream": true`, as `response.created`, one `response.output_text.delta`
    /// per piece and `response.completed` with the usage.
    fn responses(&self, sink: &Sink, headers: &HeaderMap, seq: u64) -> Answer {
        let request = match json_request(sink) {
            Ok(request) => request,
            Err(answer) => return *answer,
        };
        let (reply, input_tokens) = match request.get("input") {
            Some(Value::String(text)) => (text.clone(), words(text)),
            Some(Value::Array(items)) => (
                items
                    .iter()
                    .rev()
                    .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
                    .map(|m| message_text(m.get("content")))
                    .unwrap_or_default(),
                items
                    .iter()
                    .map(|m| words(&message_text(m.get("content"))))
                    .sum(),
            ),
            _ => {
                return Answer::Error(openai_error(
                    StatusCode::BAD_REQUEST,
                    "Missing required parameter: 'input'.",
                    "invalid_request_error",
                    Some("missing_required_parameter"),
                ));
            }
        };
        let model = request
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or(MODELS[0])
            .to_owned();
        let output_tokens = words(&reply);
        let id = format!("resp_echo{seq}");
        let item = format!("msg_echo{seq}");
        let response = |status: &str, text: &str, usage: Value| {
            json!({
                "id": id,
                "object": "response",
                "created_at": self.inner.now.unix(),
                "status": status,
                "model": model,
                "output": [{
                    "type": "message", "id": item, "status": status, "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }],
                "usage": usage,
            })
        };
        let usage = json!({
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        });
        if request.get("stream").and_then(Value::as_bool) != Some(true) {
            return Answer::Json(StatusCode::OK, response("completed", &reply, usage));
        }
        let pieces = header_str(headers, EVENTS_HEADER)
            .and_then(|n| n.trim().parse::<usize>().ok())
            .unwrap_or(DEFAULT_EVENTS)
            .clamp(1, MAX_EVENTS);
        let chars: Vec<char> = reply.chars().collect();
        let event = |n: usize, data: Value| {
            let kind = data["type"].as_str().unwrap_or_default().to_owned();
            let mut data = data;
            data["sequence_number"] = json!(n);
            Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
        };
        let mut events = VecDeque::new();
        events.push_back(event(
            0,
            json!({"type": "response.created", "response": response("in_progress", "", Value::Null)}),
        ));
        for i in 0..pieces {
            let piece: String = chars[i * chars.len() / pieces..(i + 1) * chars.len() / pieces]
                .iter()
                .collect();
            events.push_back(event(
                i + 1,
                json!({"type": "response.output_text.delta", "item_id": item, "output_index": 0, "content_index": 0, "delta": piece}),
            ));
        }
        events.push_back(event(
            pieces + 1,
            json!({"type": "response.completed", "response": response("completed", &reply, usage)}),
        ));
        Answer::Stream(SseEvents::Prepared(events))
    }

    fn file(&self, sink: &Sink, body_len: u64) -> Answer {
        let Sink::Multipart(multipart) = sink else {
            return Answer::Error(openai_error(
                StatusCode::BAD_REQUEST,
                "Uploads must be multipart/form-data with a boundary.",
                "invalid_request_error",
                None,
            ));
        };
        let Some(upload) = multipart.upload() else {
            return Answer::Error(openai_error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "Missing required parameter: 'file' (in a {body_len}-byte multipart body)."
                ),
                "invalid_request_error",
                Some("missing_required_parameter"),
            ));
        };
        Answer::Json(
            StatusCode::OK,
            json!({
                "id": format!("file-{}", &upload.sha256[..24]),
                "object": "file",
                "bytes": upload.bytes,
                "created_at": self.inner.now.unix(),
                "filename": upload.filename.unwrap_or_else(|| "upload".to_owned()),
                "purpose": upload.purpose.unwrap_or_else(|| "user_data".to_owned()),
                "status": "processed",
            }),
        )
    }

    /// A body that yields each event as its own frame, `sse_interval` apart, recording when each
    /// left; cut or paused after some events when `fault` says so. A paused stream is cut when
    /// `shutdown` is cancelled.
    fn sse_body(
        &self,
        events: SseEvents,
        fault: Option<StreamFault>,
        seq: u64,
        in_flight: InFlight,
        shutdown: CancellationToken,
    ) -> Body {
        let state = SseState {
            events,
            fault,
            sent: 0,
            seq,
            in_flight,
            done: false,
        };
        let interval = self.inner.sse_interval;
        let stream = futures_util::stream::unfold(state, move |mut state| {
            let shutdown = shutdown.clone();
            async move {
                if state.done {
                    return None;
                }
                match state.fault {
                    Some(StreamFault::Drop(after)) if after == state.sent => {
                        // Pending once first, so hyper flushes the events already written: the
                        // client sees exactly `after_events` of them before the cut.
                        if interval.is_zero() {
                            tokio::task::yield_now().await;
                        } else {
                            tokio::time::sleep(interval).await;
                        }
                        return Some((
                            state.cut("stream dropped (fault injected by the echo upstream)"),
                            state,
                        ));
                    }
                    Some(StreamFault::Pause(after)) if after == state.sent => {
                        state.fault = None;
                        let upstream = state.in_flight.upstream.clone();
                        let resumed = tokio::select! {
                            permit = upstream.inner.resumes.acquire() => {
                                permit.expect("the semaphore is never closed").forget();
                                true
                            }
                            () = shutdown.cancelled() => false,
                        };
                        if !resumed {
                            let why = "paused stream cut: the echo upstream is shutting down";
                            return Some((state.cut(why), state));
                        }
                    }
                    _ => {}
                }
                let Some(event) = state.events.next_event() else {
                    state.in_flight.complete();
                    return None;
                };
                if state.sent > 0 && !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                let upstream = &state.in_flight.upstream;
                let now = upstream.inner.now.time();
                upstream.update(state.seq, |r| r.sse_sent_at.push(now));
                state.sent += 1;
                Some((Ok(Frame::data(event)), state))
            }
        });
        StreamBody::new(stream).boxed_unsync()
    }
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("base_url", &self.inner.base_url)
            .field("verifies", &self.inner.verifier.is_some())
            .field("requests", &self.request_count())
            .field("in_flight", &self.in_flight())
            .field("cancelled", &self.cancelled())
            .finish_non_exhaustive()
    }
}

/// [`Upstream::service`]: answers each request as the echo upstream.
#[derive(Clone, Debug)]
pub struct UpstreamService {
    upstream: Upstream,
    /// Releases held requests and cuts paused streams.
    shutdown: CancellationToken,
}

impl UpstreamService {
    /// The service for one accepted connection, counted in [`Upstream::connections`]: whoever
    /// accepts the connections calls it once for each, so a test can tell whether the agent
    /// reused its upstream connections.
    pub fn for_connection(&self) -> UpstreamService {
        let inner = &self.upstream.inner;
        inner.connections.fetch_add(1, Ordering::SeqCst);
        self.upstream.changed();
        self.clone()
    }
}

impl<B> hyper::service::Service<Request<B>> for UpstreamService
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, request: Request<B>) -> Self::Future {
        let (upstream, shutdown) = (self.upstream.clone(), self.shutdown.clone());
        Box::pin(async move { Ok(upstream.handle(request, shutdown).await) })
    }
}

/// One request's span from arrival to the end of its response. Dropped before `completed`, the
/// client went away (hyper drops the handler or the body): that is a cancellation.
struct InFlight {
    upstream: Upstream,
    completed: bool,
}

impl InFlight {
    fn start(upstream: Upstream) -> Self {
        upstream.inner.in_flight.fetch_add(1, Ordering::SeqCst);
        upstream.changed();
        Self {
            upstream,
            completed: false,
        }
    }

    /// The response ended as intended (an injected fault included): not a cancellation.
    fn complete(&mut self) {
        self.completed = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let inner = &self.upstream.inner;
        if !self.completed {
            inner.cancelled.fetch_add(1, Ordering::SeqCst);
        }
        inner.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.upstream.changed();
    }
}

enum Route {
    Models,
    Model(String),
    Chat,
    Embeddings,
    Responses,
    Files,
    NotFound,
}

impl Route {
    fn of(method: &Method, path: &str) -> Route {
        let Some(start) = path.find("/v1/") else {
            return Route::NotFound;
        };
        let tail = &path[start + 3..];
        match (method, tail) {
            (&Method::GET, "/models") => Route::Models,
            (&Method::GET, t) if t.starts_with("/models/") && t.len() > "/models/".len() => {
                Route::Model(t["/models/".len()..].to_owned())
            }
            (&Method::POST, "/chat/completions") => Route::Chat,
            (&Method::POST, "/embeddings") => Route::Embeddings,
            (&Method::POST, "/responses") => Route::Responses,
            (&Method::POST, "/files") => Route::Files,
            _ => Route::NotFound,
        }
    }
}

enum Answer {
    Json(StatusCode, Value),
    Stream(SseEvents),
    Error(Response<Body>),
}

/// Where the request body goes while it is digested.
enum Sink {
    /// Kept whole (up to [`MAX_JSON_BODY`]) to be parsed.
    Json(Vec<u8>),
    /// Parsed as it streams; only the file part's length and digest are kept.
    Multipart(Box<Multipart>),
    /// An upload without a multipart boundary.
    NotMultipart,
    Discard,
}

/// A request body read to its end.
struct BodyRead {
    len: u64,
    sha256: String,
    /// The trailer fields, redacted as recorded headers are.
    trailers: Vec<(String, String)>,
    sink: Sink,
    /// Why the body could not be used (unreadable, over the limit).
    problem: Option<(StatusCode, String)>,
}

impl BodyRead {
    fn failure(&self) -> Option<Response<Body>> {
        let (status, message) = self.problem.as_ref()?;
        Some(openai_error(
            *status,
            message,
            "invalid_request_error",
            None,
        ))
    }
}

async fn read_body<B>(body: B, mut sink: Sink) -> BodyRead
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    let mut digest = digest::Context::new(&digest::SHA256);
    let mut len = 0u64;
    let mut problem = None;
    let mut trailers = Vec::new();
    while let Some(frame) = body.frame().await {
        let data = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    if let Ok(fields) = frame.into_trailers() {
                        trailers.extend(recorded_headers(&fields));
                    }
                    continue;
                }
            },
            Err(error) => {
                let error: BoxError = error.into();
                problem = Some((
                    StatusCode::BAD_REQUEST,
                    format!("The request body could not be read: {error}"),
                ));
                break;
            }
        };
        digest.update(&data);
        len += data.len() as u64;
        match &mut sink {
            Sink::Json(buffer) => {
                if buffer.len() + data.len() > MAX_JSON_BODY {
                    // Keep reading so the recorded length and digest cover the whole body.
                    problem.get_or_insert((
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("The request body is over {MAX_JSON_BODY} bytes."),
                    ));
                } else {
                    buffer.extend_from_slice(&data);
                }
            }
            Sink::Multipart(multipart) => multipart.feed(&data),
            Sink::NotMultipart | Sink::Discard => {}
        }
    }
    BodyRead {
        len,
        sha256: hex(digest.finish().as_ref()),
        trailers,
        sink,
        problem,
    }
}

/// The `boundary` of a `multipart/form-data` request.
fn multipart_boundary(headers: &HeaderMap) -> Option<String> {
    let content_type = header_str(headers, CONTENT_TYPE.as_str())?;
    let (mime, params) = content_type.split_once(';')?;
    if !mime.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"').to_owned())
            .filter(|b| !b.is_empty())
    })
}

/// A streaming `multipart/form-data` parser (RFC 7578) that keeps only the `file` part's length
/// and digest and small text fields: memory stays bounded whatever the upload's size.
struct Multipart {
    /// `CRLF--boundary`; the body is fed as if it began with a CRLF so the first delimiter
    /// looks like the others.
    delimiter: Vec<u8>,
    /// Bytes not yet classified: a possible partial delimiter, or part headers being gathered.
    pending: Vec<u8>,
    state: PartState,
    filename: Option<String>,
    purpose: Option<String>,
    /// The first `file` part: its length and running digest, then its final digest.
    file: Option<(u64, digest::Context)>,
    file_sha256: Option<String>,
}

enum PartState {
    /// Before the first delimiter.
    Preamble,
    /// Just after a delimiter: `--` ends the body, otherwise the line ends and headers follow.
    AfterDelimiter,
    Headers,
    Content(PartKind),
    /// After the closing delimiter, or after a malformed part: the rest is ignored.
    Done,
}

enum PartKind {
    File,
    /// A small text field such as `purpose`; longer values are cut.
    Purpose(Vec<u8>),
    Other,
}

/// Part headers larger than this end parsing (a malformed or hostile body).
const MAX_PART_HEADERS: usize = 16 * 1024;
/// Text fields kept up to this length.
const MAX_FIELD: usize = 1024;

impl Multipart {
    fn new(boundary: &str) -> Self {
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        Self {
            delimiter,
            pending: b"\r\n".to_vec(),
            state: PartState::Preamble,
            filename: None,
            purpose: None,
            file: None,
            file_sha256: None,
        }
    }

    fn feed(&mut self, data: &[u8]) {
        if matches!(self.state, PartState::Done) {
            return;
        }
        self.pending.extend_from_slice(data);
        let mut at = 0;
        loop {
            let rest = &self.pending[at..];
            match &mut self.state {
                PartState::Done => {
                    at = self.pending.len();
                    break;
                }
                PartState::Preamble => match find(rest, &self.delimiter) {
                    Some(i) => {
                        at += i + self.delimiter.len();
                        self.state = PartState::AfterDelimiter;
                    }
                    None => {
                        at += rest.len().saturating_sub(self.delimiter.len() - 1);
                        break;
                    }
                },
                PartState::AfterDelimiter => {
                    if rest.len() < 2 {
                        break;
                    }
                    if rest.starts_with(b"--") {
                        self.state = PartState::Done;
                        continue;
                    }
                    // Transport padding may precede the line's CRLF.
                    match find(rest, b"\r\n") {
                        Some(i) => {
                            at += i + 2;
                            self.state = PartState::Headers;
                        }
                        None if rest.len() > MAX_PART_HEADERS => self.state = PartState::Done,
                        None => break,
                    }
                }
                PartState::Headers => {
                    let end = if rest.starts_with(b"\r\n") {
                        Some((0, 2))
                    } else {
                        find(rest, b"\r\n\r\n").map(|i| (i, i + 4))
                    };
                    match end {
                        Some((headers_end, skip)) => {
                            let kind = part_kind(
                                &rest[..headers_end],
                                &mut self.filename,
                                self.file.is_some(),
                            );
                            if matches!(kind, PartKind::File) {
                                self.file = Some((0, digest::Context::new(&digest::SHA256)));
                            }
                            at += skip;
                            self.state = PartState::Content(kind);
                        }
                        None if rest.len() > MAX_PART_HEADERS => self.state = PartState::Done,
                        None => break,
                    }
                }
                PartState::Content(kind) => {
                    let (content, found) = match find(rest, &self.delimiter) {
                        Some(i) => (&rest[..i], true),
                        // Keep what could be the start of a delimiter for the next chunk.
                        None => (
                            &rest[..rest.len().saturating_sub(self.delimiter.len() - 1)],
                            false,
                        ),
                    };
                    match kind {
                        PartKind::File => {
                            if let Some((len, digest)) = &mut self.file {
                                *len += content.len() as u64;
                                digest.update(content);
                            }
                        }
                        PartKind::Purpose(value) => {
                            let room = MAX_FIELD.saturating_sub(value.len());
                            value.extend_from_slice(&content[..content.len().min(room)]);
                        }
                        PartKind::Other => {}
                    }
                    at += content.len();
                    if !found {
                        break;
                    }
                    at += self.delimiter.len();
                    let finished = std::mem::replace(&mut self.state, PartState::AfterDelimiter);
                    match finished {
                        PartState::Content(PartKind::File) => {
                            if let Some((_, digest)) = &self.file
                                && self.file_sha256.is_none()
                            {
                                self.file_sha256 = Some(hex(digest.clone().finish().as_ref()));
                            }
                        }
                        PartState::Content(PartKind::Purpose(value)) => {
                            self.purpose = Some(String::from_utf8_lossy(&value).into_owned());
                        }
                        _ => {}
                    }
                }
            }
        }
        self.pending.drain(..at);
    }

    /// The file part, once its closing delimiter has been seen.
    fn upload(&self) -> Option<Upload> {
        let sha256 = self.file_sha256.clone()?;
        let (bytes, _) = self.file.as_ref()?;
        Some(Upload {
            filename: self.filename.clone(),
            purpose: self.purpose.clone(),
            bytes: *bytes,
            sha256,
        })
    }
}

/// Classifies a part by its `Content-Disposition` name: the first `file` part is digested,
/// `purpose` kept, anything else skipped.
fn part_kind(headers: &[u8], filename: &mut Option<String>, have_file: bool) -> PartKind {
    let headers = String::from_utf8_lossy(headers);
    let Some(disposition) = headers.split("\r\n").find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-disposition")
            .then_some(value)
    }) else {
        return PartKind::Other;
    };
    let param = |wanted: &str| {
        disposition.split(';').skip(1).find_map(|p| {
            let (name, value) = p.split_once('=')?;
            (name.trim() == wanted).then(|| value.trim().trim_matches('"').to_owned())
        })
    };
    match param("name").as_deref() {
        Some("file") if !have_file => {
            *filename = param("filename");
            PartKind::File
        }
        Some("purpose") => PartKind::Purpose(Vec::new()),
        _ => PartKind::Other,
    }
}

/// The position of `needle` in `haystack`. Scans for the needle's first byte, so a large upload
/// costs about one pass over its bytes.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let mut from = 0;
    while from + needle.len() <= haystack.len() {
        let i = from
            + haystack[from..=haystack.len() - needle.len()]
                .iter()
                .position(|&b| b == first)?;
        if haystack[i..].starts_with(needle) {
            return Some(i);
        }
        from = i + 1;
    }
    None
}

/// The events of a streamed answer, produced one at a time.
enum SseEvents {
    Chat(ChatEvents),
    /// The Responses API's few events, made up front.
    Prepared(VecDeque<Bytes>),
}

impl SseEvents {
    fn next_event(&mut self) -> Option<Bytes> {
        match self {
            SseEvents::Chat(chat) => chat.next_event(),
            SseEvents::Prepared(events) => events.pop_front(),
        }
    }
}

/// The parts of a streamed chat completion, produced one event at a time.
struct ChatEvents {
    chunk: ChunkTemplate,
    /// The reply, cut into `pieces` content events on the fly (a long stream costs no memory).
    reply: Vec<char>,
    pieces: usize,
    /// Sent as a last chunk before `[DONE]` when `stream_options.include_usage` asked for it.
    usage: Option<Value>,
    /// Index of the next event: 0 is the role, then the pieces, the stop, the usage, `[DONE]`.
    next: usize,
}

struct ChunkTemplate {
    id: String,
    created: u64,
    model: String,
}

impl ChatEvents {
    fn next_event(&mut self) -> Option<Bytes> {
        let n = self.next;
        self.next = self.next.saturating_add(1);
        let pieces = self.pieces;
        let done_at = pieces + 2 + usize::from(self.usage.is_some());
        let choice = |delta: Value, finish: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
        let event = match n {
            0 => self.event(
                choice(
                    json!({"role": "assistant", "content": "", "refusal": null}),
                    Value::Null,
                ),
                None,
            ),
            n if n <= pieces => self.event(
                choice(json!({"content": self.piece(n - 1)}), Value::Null),
                None,
            ),
            n if n == pieces + 1 => self.event(choice(json!({}), json!("stop")), None),
            n if n < done_at => self.event(json!([]), self.usage.clone()),
            n if n == done_at => Bytes::from_static(b"data: [DONE]\n\n"),
            _ => return None,
        };
        Some(event)
    }

    /// Piece `i` of `pieces` about equal ones (some empty when the reply is shorter); together
    /// they are the reply.
    fn piece(&self, i: usize) -> String {
        let len = self.reply.len();
        self.reply[i * len / self.pieces..(i + 1) * len / self.pieces]
            .iter()
            .collect()
    }

    fn event(&self, choices: Value, usage: Option<Value>) -> Bytes {
        let mut chunk = json!({
            "id": self.chunk.id,
            "object": "chat.completion.chunk",
            "created": self.chunk.created,
            "model": self.chunk.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        Bytes::from(format!("data: {chunk}\n\n"))
    }
}

struct SseState {
    events: SseEvents,
    fault: Option<StreamFault>,
    sent: usize,
    seq: u64,
    in_flight: InFlight,
    done: bool,
}

impl SseState {
    /// Ends the stream with an error (the connection is reset), as the injected fault wanted:
    /// not a cancellation.
    fn cut(&mut self, why: &'static str) -> Result<Frame<Bytes>, io::Error> {
        self.done = true;
        self.in_flight.complete();
        Err(io::Error::other(why))
    }
}

/// What an [`UpstreamFault`] does to a streamed answer, after this many events.
#[derive(Clone, Copy)]
enum StreamFault {
    Drop(usize),
    Pause(usize),
}

fn embeddings(sink: &Sink) -> Answer {
    let request = match json_request(sink) {
        Ok(request) => request,
        Err(answer) => return *answer,
    };
    // OpenAI accepts a string, an array of strings, an array of token ids, or an array of arrays.
    let inputs: Vec<String> = match request.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.iter().all(Value::is_number) && !items.is_empty() => {
            vec![Value::Array(items.clone()).to_string()]
        }
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map_or_else(|| item.to_string(), str::to_owned)
            })
            .collect(),
        _ => {
            return Answer::Error(openai_error(
                StatusCode::BAD_REQUEST,
                "'input' must be a non-empty string or array.",
                "invalid_request_error",
                Some("invalid_input"),
            ));
        }
    };
    let base64 = match request.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Answer::Error(openai_error(
                StatusCode::BAD_REQUEST,
                &format!("'{other}' is not one of ['float', 'base64'] - 'encoding_format'"),
                "invalid_request_error",
                Some("invalid_value"),
            ));
        }
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let vector = embedding(input);
            let encoded = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": encoded})
        })
        .collect();
    let tokens: u64 = inputs.iter().map(|i| words(i).max(1)).sum();
    Answer::Json(
        StatusCode::OK,
        json!({
            "object": "list",
            "data": data,
            "model": request.get("model").and_then(Value::as_str).unwrap_or(MODELS[1]),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }),
    )
}

/// A unit-length vector derived from the input's SHA-256: the same input always maps to it.
pub fn embedding(input: &str) -> [f32; EMBEDDING_DIMENSIONS] {
    let hash = digest::digest(&digest::SHA256, input.as_bytes());
    let mut vector = [0f32; EMBEDDING_DIMENSIONS];
    for (value, bytes) in vector.iter_mut().zip(hash.as_ref().chunks_exact(4)) {
        let n = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        *value = (f64::from(n) / f64::from(u32::MAX) * 2.0 - 1.0) as f32;
    }
    let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|v| *v /= norm);
    }
    vector
}

fn models() -> Value {
    json!({"object": "list", "data": MODELS.iter().map(|id| model(id)).collect::<Vec<_>>()})
}

fn model(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "behest-dev"})
}

/// The request's JSON object, or the 400 to answer (boxed: it is much larger than the map).
fn json_request(sink: &Sink) -> Result<Map<String, Value>, Box<Answer>> {
    let parsed = match sink {
        Sink::Json(bytes) => serde_json::from_slice::<Value>(bytes).ok(),
        _ => None,
    };
    match parsed {
        Some(Value::Object(map)) => Ok(map),
        _ => Err(Box::new(Answer::Error(openai_error(
            StatusCode::BAD_REQUEST,
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON object.",
            "invalid_request_error",
            None,
        )))),
    }
}

/// The text of a message's `content`: a string, or the `text` parts of an array.
fn message_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn invalid_api_key(message: &str) -> Response<Body> {
    openai_error(
        StatusCode::UNAUTHORIZED,
        message,
        "invalid_request_error",
        Some("invalid_api_key"),
    )
}

/// OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`.
fn openai_error(
    status: StatusCode,
    message: &str,
    kind: &str,
    code: Option<&str>,
) -> Response<Body> {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    with_json_type(
        Response::builder().status(status),
        full(Bytes::from(body.to_string())),
    )
}

fn with_json_type(builder: http::response::Builder, body: Body) -> Response<Body> {
    builder
        .header(CONTENT_TYPE, "application/json")
        .body(body)
        .expect("a valid response head")
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Half of `bytes`, then an error: the connection is cut mid-body.
fn truncated_body(bytes: Bytes) -> Body {
    use futures_util::StreamExt as _;
    let half = bytes.slice(..bytes.len() / 2);
    let head = futures_util::stream::once(async move { Ok(Frame::data(half)) });
    let cut = futures_util::stream::once(async {
        // Pending once, so hyper flushes the half before the cut.
        tokio::task::yield_now().await;
        Err(io::Error::other(
            "body dropped (fault injected by the echo upstream)",
        ))
    });
    StreamBody::new(head.chain(cut)).boxed_unsync()
}

fn recorded_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let value = match name.as_str() {
                "authorization" | "proxy-authorization" => "<redacted>".to_owned(),
                _ => String::from_utf8_lossy(value.as_bytes()).into_owned(),
            };
            (name.as_str().to_owned(), value)
        })
        .collect()
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    use hyper::service::Service as _;

    use crate::idp::IdpOptions;

    const AUDIENCE: &str = "https://api.behest.test";
    const CLIENT_ID: &str = "dev-client";

    /// An IdP and an upstream verifying its tokens. The tests call the upstream's service
    /// directly: no socket, the request and response bodies are what hyper would stream.
    struct World {
        idp: Idp,
        upstream: Upstream,
    }

    fn world() -> World {
        let idp = Idp::new(
            SocketAddr::from(([127, 0, 0, 1], 4000)),
            IdpOptions::new(CLIENT_ID, "dev-secret", AUDIENCE),
        );
        let mut opts = UpstreamOptions::for_idp(&idp, AUDIENCE);
        opts.sse_interval = Duration::from_millis(1);
        World {
            upstream: new_upstream(opts),
            idp,
        }
    }

    fn new_upstream(opts: UpstreamOptions) -> Upstream {
        Upstream::new(SocketAddr::from(([127, 0, 0, 1], 4001)), opts)
    }

    /// The upstream's answer to `request`, its body not yet read.
    async fn call<B>(upstream: &Upstream, request: Request<B>) -> Response<Body>
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        upstream
            .service(CancellationToken::new())
            .call(request)
            .await
            .unwrap_or_else(|never| match never {})
    }

    /// Waits until no response is in flight, then checks how many of them were cancelled.
    async fn assert_settled(upstream: &Upstream, cancelled: u64) {
        within(
            "the responses to end",
            upstream.wait_for(|u| u.in_flight() == 0),
        )
        .await;
        assert_eq!(upstream.cancelled(), cancelled);
    }

    /// Guards against a hang; not a timing assertion.
    async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(20), future)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }

    /// An answer read frame by frame to its end (or to the error that cut it).
    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        frames: Vec<Bytes>,
        cut: bool,
    }

    impl Answer {
        fn body(&self) -> Vec<u8> {
            self.frames.concat()
        }

        fn json(&self) -> Value {
            serde_json::from_slice(&self.body()).unwrap_or_else(|_| {
                panic!(
                    "a JSON body, got {:?}",
                    String::from_utf8_lossy(&self.body())
                )
            })
        }

        fn assert_invalid_api_key(&self, case: &str) {
            assert_eq!(self.status, StatusCode::UNAUTHORIZED, "{case}");
            let body = self.json();
            assert_eq!(body["error"]["type"], "invalid_request_error", "{case}");
            assert_eq!(body["error"]["code"], "invalid_api_key", "{case}");
            assert!(body["error"]["message"].is_string(), "{case}");
        }
    }

    struct Call<'a> {
        method: Method,
        path: &'a str,
        bearer: Option<&'a str>,
        headers: Vec<(&'a str, &'a str)>,
        body: Bytes,
    }

    impl<'a> Call<'a> {
        fn new(method: Method, path: &'a str, bearer: Option<&'a str>) -> Self {
            Self {
                method,
                path,
                bearer,
                headers: Vec::new(),
                body: Bytes::new(),
            }
        }

        fn json(mut self, body: Value) -> Self {
            self.headers.push(("content-type", "application/json"));
            self.body = Bytes::from(body.to_string());
            self
        }

        fn header(mut self, name: &'a str, value: &'a str) -> Self {
            self.headers.push((name, value));
            self
        }

        fn request(self) -> Request<Full<Bytes>> {
            let mut request = Request::builder().method(self.method).uri(self.path);
            if let Some(bearer) = self.bearer {
                request = request.header(AUTHORIZATION, format!("Bearer {bearer}"));
            }
            for (name, value) in self.headers {
                request = request.header(name, value);
            }
            request.body(Full::new(self.body)).expect("a valid request")
        }

        async fn send(self, upstream: &Upstream) -> Answer {
            let (parts, mut body) = call(upstream, self.request()).await.into_parts();
            let mut frames = Vec::new();
            let mut cut = false;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => frames.extend(frame.into_data().ok()),
                    Err(_) => {
                        cut = true;
                        break;
                    }
                }
            }
            Answer {
                status: parts.status,
                headers: parts.headers,
                frames,
                cut,
            }
        }
    }

    fn chat(content: &str, stream: bool) -> Value {
        json!({
            "model": "echo-1",
            "stream": stream,
            "stream_options": {"include_usage": true},
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "first answer"},
                {"role": "user", "content": [{"type": "text", "text": content}]},
            ],
        })
    }

    /// The `data:` payloads of an SSE body, in order.
    fn sse_data(body: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(body)
            .split("\n\n")
            .filter(|event| !event.is_empty())
            .map(|event| {
                event
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("an SSE data line, got {event:?}"))
                    .to_owned()
            })
            .collect()
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        hex(digest::digest(&digest::SHA256, bytes).as_ref())
    }

    fn multipart(boundary: &str, purpose: &str, filename: &str, content: &[u8]) -> Vec<u8> {
        let mut body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(content);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        body
    }

    /// File content that holds near-misses of the delimiter, across which a parser can stumble.
    fn tricky_content(boundary: &str) -> Vec<u8> {
        let mut content = Vec::new();
        for i in 0..5_000u32 {
            content.extend_from_slice(&i.to_le_bytes());
            content.extend_from_slice(b"\r\n--");
            content.extend_from_slice(&boundary.as_bytes()[..boundary.len() - 1]);
            content.extend_from_slice(b"\r\r\n-");
        }
        content
    }

    #[tokio::test]
    async fn models_are_listed_for_a_valid_token() {
        let w = world();
        let token = w.idp.mint(json!({}));

        let answer = Call::new(Method::GET, "/v1/models", Some(&token))
            .send(&w.upstream)
            .await;

        assert_eq!(answer.status, StatusCode::OK);
        let ids: Vec<Value> = answer.json()["data"]
            .as_array()
            .expect("a model list")
            .iter()
            .map(|m| m["id"].clone())
            .collect();
        assert_eq!(ids, [json!("echo-1"), json!("embed-1")]);
    }

    #[tokio::test]
    async fn chat_completion_echoes_the_last_user_message_and_records_the_claims() {
        let w = world();
        let token = w.idp.mint(json!({}));

        let answer = Call::new(Method::POST, "/v1/chat/completions", Some(&token))
            .json(chat("hello there echo", false))
            .header("x-session-id", "job-42")
            .send(&w.upstream)
            .await;

        assert_eq!(answer.status, StatusCode::OK);
        let body = answer.json();
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["choices"][0]["message"]["role"], "assistant");
        assert_eq!(body["choices"][0]["message"]["content"], "hello there echo");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["usage"]["completion_tokens"], 3);
        assert_eq!(body["usage"]["total_tokens"], 2 + 2 + 2 + 3 + 3);

        let recorded = w.upstream.requests();
        let [request] = recorded.as_slice() else {
            panic!("one recorded request, got {recorded:?}");
        };
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/v1/chat/completions");
        assert_eq!(request.status, Some(200));
        assert_eq!(request.bearer, BearerKind::Jwt);
        assert_eq!(request.session_id.as_deref(), Some("job-42"));
        assert_eq!(request.header("authorization"), Some("<redacted>"));
        let claims = request.claims.as_ref().expect("the verified claims");
        assert_eq!(claims["uid"], CLIENT_ID);
        assert_eq!(claims["tid"], "dev-tenant");
        assert_eq!(claims["pid"], "dev-project");
        let sent = Bytes::from(chat("hello there echo", false).to_string());
        assert_eq!(request.body_len, sent.len() as u64);
        assert_eq!(request.body_sha256, sha256_hex(&sent));
    }

    #[tokio::test]
    async fn streamed_chat_sends_each_event_as_its_own_frame_and_ends_with_done() {
        let w = world();
        let token = w.idp.mint(json!({}));

        let answer = Call::new(Method::POST, "/v1/chat/completions", Some(&token))
            .json(chat("streaming works fine", true))
            .header(EVENTS_HEADER, "4")
            .send(&w.upstream)
            .await;

        assert_eq!(answer.status, StatusCode::OK);
        assert!(!answer.cut);
        assert_eq!(
            answer
                .headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            Some("text/event-stream")
        );
        for frame in &answer.frames {
            let ends = frame.windows(2).filter(|w| w == b"\n\n").count();
            assert!(ends <= 1, "a frame carries several events: {frame:?}");
        }
        let data = sse_data(&answer.body());
        // role, 4 content pieces, stop, usage, [DONE]
        assert_eq!(data.len(), 8, "{data:?}");
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = data[..7]
            .iter()
            .map(|d| serde_json::from_str(d).expect("a JSON chunk"))
            .collect();
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk")
        );
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let content: String = chunks[1..5]
            .iter()
            .map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .expect("content")
            })
            .collect();
        assert_eq!(content, "streaming works fine");
        assert_eq!(chunks[5]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[6]["usage"]["completion_tokens"], 3);

        let recorded = &w.upstream.requests()[0];
        assert_eq!(recorded.sse_sent_at.len(), 8);
        assert!(recorded.sse_sent_at.is_sorted());
        assert_settled(&w.upstream, 0).await;
    }

    #[tokio::test]
    async fn embeddings_are_the_same_vector_as_floats_and_as_base64_little_endian_f32() {
        let w = world();
        let token = w.idp.mint(json!({}));
        let ask = |format: Option<&str>| {
            let mut body = json!({"model": "embed-1", "input": ["alpha", "beta"]});
            if let Some(format) = format {
                body["encoding_format"] = json!(format);
            }
            Call::new(Method::POST, "/v1/embeddings", Some(&token)).json(body)
        };

        let floats = ask(None).send(&w.upstream).await;
        let base64 = ask(Some("base64")).send(&w.upstream).await;

        assert_eq!(floats.status, StatusCode::OK);
        assert_eq!(base64.status, StatusCode::OK);
        let (floats, base64) = (floats.json(), base64.json());
        for (index, input) in ["alpha", "beta"].into_iter().enumerate() {
            let expected = embedding(input);
            let as_floats: Vec<f32> = floats["data"][index]["embedding"]
                .as_array()
                .expect("a float array")
                .iter()
                .map(|v| v.as_f64().expect("a number") as f32)
                .collect();
            assert_eq!(as_floats, expected);
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(
                    base64["data"][index]["embedding"]
                        .as_str()
                        .expect("a base64 string"),
                )
                .expect("valid base64");
            let decoded: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(decoded, expected);
            assert_eq!(decoded.len(), EMBEDDING_DIMENSIONS);
        }
        assert_ne!(embedding("alpha"), embedding("beta"));
    }

    #[tokio::test]
    async fn file_upload_reports_the_file_part_size_and_digest() {
        let w = world();
        let token = w.idp.mint(json!({}));
        let boundary = "----behest-boundary-7MA4YWxk";
        let content = tricky_content(boundary);
        let body = multipart(boundary, "batch", "in.jsonl", &content);
        let content_type = format!("multipart/form-data; boundary={boundary}");

        let mut call = Call::new(Method::POST, "/v1/files", Some(&token))
            .header("content-type", &content_type);
        call.body = Bytes::from(body.clone());
        let answer = call.send(&w.upstream).await;

        assert_eq!(
            answer.status,
            StatusCode::OK,
            "{:?}",
            String::from_utf8_lossy(&answer.body())
        );
        let file = answer.json();
        assert_eq!(file["object"], "file");
        assert_eq!(file["bytes"], content.len() as u64);
        assert_eq!(file["filename"], "in.jsonl");
        assert_eq!(file["purpose"], "batch");
        let recorded = &w.upstream.requests()[0];
        let upload = recorded.upload.as_ref().expect("the file part");
        assert_eq!(upload.bytes, content.len() as u64);
        assert_eq!(upload.sha256, sha256_hex(&content));
        assert_eq!(recorded.body_len, body.len() as u64);
        assert_eq!(recorded.body_sha256, sha256_hex(&body));
    }

    #[test]
    fn multipart_parser_finds_the_file_whatever_the_chunking() {
        let boundary = "xyzBOUNDARYxyz";
        let content = tricky_content(boundary);
        let body = multipart(boundary, "fine-tune", "data.bin", &content);
        for chunk in [1, 2, 3, 5, 17, 64, 4096, body.len()] {
            let mut parser = Multipart::new(boundary);
            for piece in body.chunks(chunk) {
                parser.feed(piece);
            }
            let upload = parser
                .upload()
                .unwrap_or_else(|| panic!("no file part with {chunk}-byte chunks"));
            assert_eq!(upload.bytes, content.len() as u64, "{chunk}-byte chunks");
            assert_eq!(upload.sha256, sha256_hex(&content), "{chunk}-byte chunks");
            assert_eq!(upload.filename.as_deref(), Some("data.bin"));
            assert_eq!(upload.purpose.as_deref(), Some("fine-tune"));
        }
    }

    #[tokio::test]
    async fn tokens_behest_would_refuse_get_401_invalid_api_key() {
        let w = world();
        let valid = w.idp.mint(json!({}));
        let other = w.idp.mint(json!({"tid": "another-tenant"}));
        // The header and payload of one token with the signature of another.
        let (signed, _) = valid.rsplit_once('.').expect("a JWT");
        let (_, signature) = other.rsplit_once('.').expect("a JWT");
        let bad_signature = format!("{signed}.{signature}");
        let expired_at = Now::system().unix() - 600;
        let cases = [
            (
                "no uid",
                Some(w.idp.mint(json!({"uid": null}))),
                BearerKind::Jwt,
            ),
            (
                "no tid",
                Some(w.idp.mint(json!({"tid": null}))),
                BearerKind::Jwt,
            ),
            (
                "no pid",
                Some(w.idp.mint(json!({"pid": null}))),
                BearerKind::Jwt,
            ),
            (
                "wrong audience",
                Some(w.idp.mint(json!({"aud": "https://elsewhere.test"}))),
                BearerKind::Jwt,
            ),
            (
                "wrong issuer",
                Some(w.idp.mint(json!({"iss": "https://evil.test/"}))),
                BearerKind::Jwt,
            ),
            (
                "expired",
                Some(
                    w.idp
                        .mint(json!({"exp": expired_at, "iat": expired_at - 60})),
                ),
                BearerKind::Jwt,
            ),
            ("bad signature", Some(bad_signature), BearerKind::Jwt),
            (
                "opaque",
                Some("sk-not-a-jwt".to_owned()),
                BearerKind::Opaque,
            ),
            (
                "placeholder",
                Some(PLACEHOLDER_KEY.to_owned()),
                BearerKind::Placeholder,
            ),
            ("no bearer", None, BearerKind::Missing),
        ];

        for (case, bearer, _) in &cases {
            Call::new(Method::GET, "/v1/models", bearer.as_deref())
                .send(&w.upstream)
                .await
                .assert_invalid_api_key(case);
        }

        let recorded = w.upstream.requests();
        assert_eq!(recorded.len(), cases.len());
        for ((case, _, kind), request) in cases.iter().zip(&recorded) {
            assert_eq!(request.bearer, *kind, "{case}");
            assert_eq!(request.claims, None, "{case}");
            assert_eq!(request.status, Some(401), "{case}");
        }
        // The valid token still passes: the refusals were about the tokens.
        let answer = Call::new(Method::GET, "/v1/models", Some(&valid))
            .send(&w.upstream)
            .await;
        assert_eq!(answer.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn fast_mode_takes_any_real_bearer_but_not_the_placeholder() {
        let upstream = new_upstream(UpstreamOptions::new(AUDIENCE));

        let opaque = Call::new(Method::GET, "/v1/models", Some("anything"))
            .send(&upstream)
            .await;
        let placeholder = Call::new(Method::GET, "/v1/models", Some(PLACEHOLDER_KEY))
            .send(&upstream)
            .await;
        let missing = Call::new(Method::GET, "/v1/models", None)
            .send(&upstream)
            .await;

        assert_eq!(opaque.status, StatusCode::OK);
        placeholder.assert_invalid_api_key("placeholder");
        missing.assert_invalid_api_key("no bearer");
        assert_eq!(upstream.requests()[0].claims, None);
    }

    #[tokio::test]
    async fn unknown_paths_get_an_openai_shaped_404_and_a_path_prefix_is_kept() {
        let w = world();
        let token = w.idp.mint(json!({}));

        let unknown = Call::new(Method::GET, "/v1/nothing-here", Some(&token))
            .send(&w.upstream)
            .await;
        let prefixed = Call::new(Method::GET, "/behest/v1/models?limit=2", Some(&token))
            .send(&w.upstream)
            .await;

        assert_eq!(unknown.status, StatusCode::NOT_FOUND);
        assert_eq!(unknown.json()["error"]["type"], "invalid_request_error");
        assert_eq!(unknown.json()["error"]["code"], "unknown_url");
        assert_eq!(prefixed.status, StatusCode::OK);
        assert_eq!(w.upstream.requests()[1].path, "/behest/v1/models?limit=2");
    }

    #[tokio::test]
    async fn one_shot_and_persistent_faults_answer_instead_of_the_echo() {
        let w = world();
        let token = w.idp.mint(json!({}));
        let models = || Call::new(Method::GET, "/v1/models", Some(&token));

        w.upstream.fail_next(1, UpstreamFault::Unauthorized);
        w.upstream.fail_next(1, UpstreamFault::Status(503));
        models()
            .send(&w.upstream)
            .await
            .assert_invalid_api_key("Unauthorized fault");
        let unavailable = models().send(&w.upstream).await;
        assert_eq!(unavailable.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(unavailable.json()["error"]["type"], "server_error");
        assert_eq!(models().send(&w.upstream).await.status, StatusCode::OK);

        w.upstream.set_fault(Some(UpstreamFault::Status(502)));
        assert_eq!(
            models().send(&w.upstream).await.status,
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            models().send(&w.upstream).await.status,
            StatusCode::BAD_GATEWAY
        );
        w.upstream.set_fault(None);
        assert_eq!(models().send(&w.upstream).await.status, StatusCode::OK);

        w.upstream
            .fail_next(1, UpstreamFault::SlowHeaders(Duration::from_millis(1)));
        assert_eq!(models().send(&w.upstream).await.status, StatusCode::OK);

        let statuses: Vec<Option<u16>> = w.upstream.requests().iter().map(|r| r.status).collect();
        let expected = [401, 503, 200, 502, 502, 200, 200].map(Some);
        assert_eq!(statuses, expected);
        assert_eq!(w.upstream.request_count(), 7);
    }

    #[tokio::test]
    async fn dropped_stream_cuts_the_body_after_the_given_events() {
        let w = world();
        let token = w.idp.mint(json!({}));
        w.upstream
            .fail_next(1, UpstreamFault::DropStream { after_events: 2 });

        let answer = Call::new(Method::POST, "/v1/chat/completions", Some(&token))
            .json(chat("cut me off", true))
            .send(&w.upstream)
            .await;

        assert_eq!(answer.status, StatusCode::OK);
        assert!(answer.cut, "the body ended cleanly");
        let data = sse_data(&answer.body());
        assert_eq!(data.len(), 2);
        assert!(!data.iter().any(|d| d == "[DONE]"));
        assert_eq!(w.upstream.requests()[0].sse_sent_at.len(), 2);
        // A fault is not a cancellation.
        assert_settled(&w.upstream, 0).await;
    }

    /// A streamed chat request with the default number of pieces and a usage chunk.
    fn stream_request(token: &str) -> Request<Full<Bytes>> {
        Call::new(Method::POST, "/v1/chat/completions", Some(token))
            .json(chat("pause in the middle", true))
            .request()
    }

    /// The `data:` payload of each frame until the body ends or breaks (`Err` then).
    async fn rest_of(body: &mut Body) -> Result<Vec<String>, io::Error> {
        let mut data = Vec::new();
        while let Some(frame) = within("the next event", body.frame()).await {
            data.extend(sse_data(&frame?.into_data().expect("a data frame")));
        }
        Ok(data)
    }

    // The clock is paused: a pause is told from the 1 ms between events by letting an hour pass.
    #[tokio::test(start_paused = true)]
    async fn paused_stream_sends_nothing_after_the_given_events_until_resumed() {
        let w = world();
        let token = w.idp.mint(json!({}));
        w.upstream
            .fail_next(1, UpstreamFault::PauseStream { after_events: 2 });

        let mut body = call(&w.upstream, stream_request(&token)).await.into_body();
        for _ in 0..2 {
            let frame = body.frame().await.expect("an event").expect("readable");
            assert!(frame.data_ref().is_some_and(|d| d.starts_with(b"data: ")));
        }
        let paused = tokio::time::timeout(Duration::from_secs(3600), body.frame()).await;
        assert!(paused.is_err(), "an event came while paused: {paused:?}");
        assert_eq!(w.upstream.requests()[0].sse_sent_at.len(), 2);
        w.upstream.resume_stream();

        let rest = rest_of(&mut body)
            .await
            .expect("the stream goes on to its end");
        // 5 content pieces, stop, usage, [DONE] after the role and the first piece.
        assert_eq!(rest.len(), 7, "{rest:?}");
        assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
        assert_eq!(w.upstream.requests()[0].sse_sent_at.len(), 9);
        assert_eq!(w.upstream.cancelled(), 0);
    }

    #[tokio::test]
    async fn a_resume_given_before_the_stream_pauses_is_kept_for_it() {
        let w = world();
        let token = w.idp.mint(json!({}));
        w.upstream.resume_stream();
        w.upstream
            .fail_next(1, UpstreamFault::PauseStream { after_events: 1 });

        let mut body = call(&w.upstream, stream_request(&token)).await.into_body();

        let data = rest_of(&mut body)
            .await
            .expect("the stream runs to its end");
        assert_eq!(data.len(), 9, "{data:?}");
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    }

    #[tokio::test]
    async fn paused_stream_is_cut_at_shutdown_and_not_counted_cancelled() {
        let w = world();
        let token = w.idp.mint(json!({}));
        w.upstream
            .fail_next(1, UpstreamFault::PauseStream { after_events: 1 });
        let shutdown = CancellationToken::new();

        let response = w
            .upstream
            .service(shutdown.clone())
            .call(stream_request(&token))
            .await
            .unwrap_or_else(|never| match never {});
        let mut body = response.into_body();
        body.frame()
            .await
            .expect("a first event")
            .expect("readable");
        shutdown.cancel();

        assert!(rest_of(&mut body).await.is_err(), "the body ended cleanly");
        drop(body);
        assert_settled(&w.upstream, 0).await;
    }

    #[tokio::test]
    async fn trailers_are_recorded_with_credentials_redacted() {
        let w = world();
        let token = w.idp.mint(json!({}));
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("abc"));
        trailers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer sk-trailer"));
        let frames = vec![
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"{\"input\": \"x\"}"))),
            Ok(Frame::trailers(trailers)),
        ];
        let request = Request::post("/v1/embeddings")
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .body(StreamBody::new(futures_util::stream::iter(frames)))
            .expect("a valid request");

        let response = call(&w.upstream, request).await;

        assert_eq!(response.status(), StatusCode::OK);
        let recorded = &w.upstream.requests()[0];
        let mut fields = recorded.trailers.clone();
        fields.sort();
        assert_eq!(
            fields,
            [
                ("authorization".to_owned(), "<redacted>".to_owned()),
                ("x-checksum".to_owned(), "abc".to_owned()),
            ]
        );
        assert_eq!(recorded.body_len, 14);
    }

    #[tokio::test]
    async fn held_request_is_counted_cancelled_when_the_client_goes_away() {
        let w = world();
        let token = w.idp.mint(json!({}));
        w.upstream.fail_next(1, UpstreamFault::Hold);
        let request = Call::new(Method::GET, "/v1/models", Some(&token)).request();
        let upstream = w.upstream.clone();
        let pending = tokio::spawn(async move { call(&upstream, request).await.status() });

        within(
            "the request to be held",
            w.upstream.wait_for(|u| u.requests().len() == 1),
        )
        .await;
        assert_eq!(w.upstream.in_flight(), 1);
        assert_eq!(w.upstream.requests()[0].status, None);
        pending.abort();

        assert_settled(&w.upstream, 1).await;
    }

    #[tokio::test]
    async fn client_leaving_mid_stream_is_counted_as_cancelled() {
        let w = world();
        let token = w.idp.mint(json!({}));
        let request = Call::new(Method::POST, "/v1/chat/completions", Some(&token))
            .json(chat("a very long answer", true))
            .header(EVENTS_HEADER, "100000")
            .request();

        let response = call(&w.upstream, request).await;
        let mut body = response.into_body();
        let first = body
            .frame()
            .await
            .expect("a first event")
            .expect("readable");
        assert!(first.data_ref().is_some_and(|d| d.starts_with(b"data: ")));
        drop(body);

        within(
            "the cancellation",
            w.upstream.wait_for(|u| u.cancelled() == 1),
        )
        .await;
        within(
            "the stream to end",
            w.upstream.wait_for(|u| u.in_flight() == 0),
        )
        .await;
        assert!(w.upstream.requests()[0].sse_sent_at.len() < 100_003);
    }

    #[tokio::test]
    async fn dropped_json_answer_is_cut_mid_body() {
        let w = world();
        let token = w.idp.mint(json!({}));
        w.upstream
            .fail_next(1, UpstreamFault::DropStream { after_events: 0 });

        let answer = Call::new(Method::GET, "/v1/models", Some(&token))
            .send(&w.upstream)
            .await;

        assert_eq!(answer.status, StatusCode::OK);
        assert!(answer.cut, "the body ended cleanly");
        assert!(serde_json::from_slice::<Value>(&answer.body()).is_err());
    }
}
