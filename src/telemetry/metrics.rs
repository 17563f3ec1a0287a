//! Prometheus metrics (`prometheus-client`), all named `behest_agent_*`, and the small HTTP server
//! that exposes them with `/healthz` and `/readyz`. Labels are low-cardinality (result, error code,
//! status class); a metric never carries a token, a secret, a path or a session id.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrantLabels {
    /// The token engine's profile (`default` for `[auth]`).
    pub profile: String,
    /// `ok` or `error`.
    pub result: String,
    /// The error code (`invalid_client`, `http_503`, `unreachable`, …); empty on success.
    pub code: String,
}

/// A per-token-engine gauge's label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProfileLabels {
    /// `default` for `[auth]`, else the `[profiles.NAME]`.
    pub profile: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `hit`, `miss` or `error`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    /// The status class: `2xx`, `4xx`, `5xx`, …
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `unreachable`, `timeout`, `reset`, …
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// The response's model (bounded: see `usage::MAX_MODELS`).
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenKindLabels {
    pub model: String,
    /// `prompt` or `completion`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    /// `session_tokens`, `session_requests` or `hourly_tokens`.
    pub budget: &'static str,
}

/// One model's usage counters.
#[derive(Debug, Clone)]
pub struct ModelCounters {
    pub requests: Counter,
    pub prompt: Counter,
    pub completion: Counter,
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub grants: Family<GrantLabels, Counter>,
    pub token_expiry_timestamp: Family<ProfileLabels, Gauge>,
    pub token_seconds_remaining: Family<ProfileLabels, Gauge<f64, AtomicU64>>,
    pub token_ready: Family<ProfileLabels, Gauge>,
    pub proxy_requests: Family<CodeLabels, Counter>,
    /// `proxy_requests` per class, resolved once: the hot path then skips the family's lock,
    /// hash and label allocation.
    by_class: [std::sync::OnceLock<Counter>; 5],
    pub request_duration: Histogram,
    pub in_flight_requests: Gauge,
    pub in_flight_streams: Gauge,
    pub upstream_errors: Family<KindLabels, Counter>,
    pub replays: Counter,
    /// Looks for the fleet's shared token before a grant, by result (`hit`, `miss`, `error`).
    pub fleet_reads: Family<ResultLabels, Counter>,
    /// Grants this agent made and shared with the fleet.
    pub fleet_grants: Counter,
    pub usage_tokens: Family<TokenKindLabels, Counter>,
    pub usage_requests: Family<ModelLabels, Counter>,
    pub budget_refusals: Family<BudgetLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("behest_agent");
        let grants = Family::<GrantLabels, Counter>::default();
        registry.register(
            "grants",
            "Token grants by result and error code",
            grants.clone(),
        );
        let token_expiry_timestamp = Family::<ProfileLabels, Gauge>::default();
        registry.register(
            "token_expiry_timestamp_seconds",
            "Expiry of the current token (Unix time)",
            token_expiry_timestamp.clone(),
        );
        let token_seconds_remaining = Family::<ProfileLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "token_seconds_until_expiry",
            "Seconds until the current token expires",
            token_seconds_remaining.clone(),
        );
        let token_ready = Family::<ProfileLabels, Gauge>::default();
        registry.register(
            "token_ready",
            "1 when a valid token is held",
            token_ready.clone(),
        );
        let proxy_requests = Family::<CodeLabels, Counter>::default();
        registry.register(
            "proxy_requests",
            "Proxied requests by status class",
            proxy_requests.clone(),
        );
        let request_duration = Histogram::new([
            0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0,
        ]);
        registry.register(
            "proxy_request_duration_seconds",
            "Time from request to the end of the response body",
            request_duration.clone(),
        );
        let in_flight_requests = Gauge::default();
        registry.register(
            "in_flight_requests",
            "Proxied requests in flight",
            in_flight_requests.clone(),
        );
        let in_flight_streams = Gauge::default();
        registry.register(
            "in_flight_streams",
            "Streamed (text/event-stream) responses in flight",
            in_flight_streams.clone(),
        );
        let upstream_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Upstream failures by kind",
            upstream_errors.clone(),
        );
        let replays = Counter::default();
        registry.register(
            "replays",
            "Requests replayed after a 401 from the upstream",
            replays.clone(),
        );
        let fleet_reads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "fleet_reads",
            "Looks for the fleet's shared token before a grant: hit (used, no grant), miss (this agent granted), error (Redis failed or held garbage)",
            fleet_reads.clone(),
        );
        let fleet_grants = Counter::default();
        registry.register(
            "fleet_grants",
            "Grants this agent made and shared with the fleet through Redis",
            fleet_grants.clone(),
        );
        let usage_tokens = Family::<TokenKindLabels, Counter>::default();
        registry.register(
            "usage_tokens",
            "Tokens the upstream reported, by model and kind (prompt, completion)",
            usage_tokens.clone(),
        );
        let usage_requests = Family::<ModelLabels, Counter>::default();
        registry.register(
            "usage_requests",
            "Accounted responses (chat, completions, embeddings, responses) by model",
            usage_requests.clone(),
        );
        let budget_refusals = Family::<BudgetLabels, Counter>::default();
        registry.register(
            "budget_refusals",
            "Requests refused with 429 budget_exceeded, by budget",
            budget_refusals.clone(),
        );
        Self {
            registry,
            grants,
            token_expiry_timestamp,
            token_seconds_remaining,
            token_ready,
            proxy_requests,
            by_class: Default::default(),
            request_duration,
            in_flight_requests,
            in_flight_streams,
            upstream_errors,
            replays,
            fleet_reads,
            fleet_grants,
            usage_tokens,
            usage_requests,
            budget_refusals,
        }
    }

    /// The usage counters of one model (looked up in their families once, then kept).
    pub fn usage_counters(&self, model: &str) -> ModelCounters {
        let tokens = |kind| {
            self.usage_tokens
                .get_or_create(&TokenKindLabels {
                    model: model.to_string(),
                    kind,
                })
                .clone()
        };
        ModelCounters {
            requests: self
                .usage_requests
                .get_or_create(&ModelLabels {
                    model: model.to_string(),
                })
                .clone(),
            prompt: tokens("prompt"),
            completion: tokens("completion"),
        }
    }

    pub fn budget_refusal(&self, budget: &'static str) {
        self.budget_refusals
            .get_or_create(&BudgetLabels { budget })
            .inc();
    }

    pub fn fleet_read(&self, result: &str) {
        self.fleet_reads
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .inc();
    }

    /// Drops a removed profile's token gauges, which would otherwise show it ready forever (its
    /// grant counts stay).
    pub fn forget_profile(&self, profile: &str) {
        let label = ProfileLabels {
            profile: profile.to_string(),
        };
        self.token_expiry_timestamp.remove(&label);
        self.token_seconds_remaining.remove(&label);
        self.token_ready.remove(&label);
    }

    pub fn grant(&self, profile: &str, ok: bool, code: &str) {
        self.grants
            .get_or_create(&GrantLabels {
                profile: profile.to_string(),
                result: if ok { "ok" } else { "error" }.to_string(),
                code: code.to_string(),
            })
            .inc();
    }

    pub fn proxy_response(&self, status: u16, duration: Duration) {
        const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        let i = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[i]
            .get_or_init(|| {
                self.proxy_requests
                    .get_or_create(&CodeLabels {
                        code: CLASSES[i].to_string(),
                    })
                    .clone()
            })
            .inc();
        self.request_duration.observe(duration.as_secs_f64());
    }

    pub fn upstream_error(&self, kind: &str) {
        self.upstream_errors
            .get_or_create(&KindLabels {
                kind: kind.to_string(),
            })
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// What the metrics server asks the running agent at each request.
pub trait Health: Send + Sync + 'static {
    /// Updates time-dependent gauges just before a scrape.
    fn before_scrape(&self, metrics: &Metrics);
    /// Ready: a valid token is held (by `profile`, else the default profile) and the listeners
    /// are bound.
    fn ready(&self, profile: Option<&str>) -> Result<(), String>;
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<dyn Health>,
    shutdown: CancellationToken,
) {
    let make = move |_| {
        let (metrics, health) = (metrics.clone(), health.clone());
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let response = if matches!(*req.method(), http::Method::GET | http::Method::HEAD) {
                route(&metrics, health.as_ref(), req.uri())
            } else {
                let mut r = Response::new(Full::new(Bytes::from_static(b"GET or HEAD only\n")));
                *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
                r.headers_mut().insert(
                    http::header::ALLOW,
                    http::HeaderValue::from_static("GET, HEAD"),
                );
                r
            };
            async move { Ok::<_, Infallible>(response) }
        })
    };
    let listeners = vec![crate::server::Listener::Tcp(listener)];
    crate::server::serve(listeners, crate::server::Limits::LOCAL, make, shutdown).await
}

fn route(metrics: &Metrics, health: &dyn Health, uri: &http::Uri) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match uri.path() {
        "/metrics" => {
            health.before_scrape(metrics);
            (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics.encode(),
            )
        }
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => match health.ready(profile(uri).as_deref()) {
            Ok(()) => (StatusCode::OK, "text/plain", "ready\n".to_string()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("a static response builds")
}

/// The `profile` query parameter, as `/readyz?profile=NAME` on the control socket takes it.
fn profile(uri: &http::Uri) -> Option<String> {
    url::form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(k, _)| k == "profile")
        .map(|(_, v)| v.into_owned())
}
