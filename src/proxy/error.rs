//! The errors the proxy answers itself, each mapped to a status and an OpenAI-shaped body
//! (`{"error":{"message","type":"behest_agent_error","code"}}`) so an SDK shows them like any API
//! error; and [`SetupError`], why a proxy cannot be built. A message never holds a secret: token
//! errors come from `TokenError`'s `Display`, which never formats one.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

/// An answer the agent makes itself instead of forwarding.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No valid token (the IdP is down and the cached token expired, or the grant is refused).
    #[error("{0}")]
    TokenUnavailable(String),
    /// The upstream could not be connected to, or the exchange with it failed.
    #[error("cannot reach the upstream {authority}: {reason}")]
    UpstreamUnreachable { authority: String, reason: String },
    /// Every upstream connection was in use and none came free within `proxy.connect_timeout`.
    #[error(
        "all {limit} upstream connections (proxy.max_upstream_connections) are in use and none came free within {waited} (proxy.connect_timeout); retry later, or raise proxy.max_upstream_connections"
    )]
    UpstreamBusy { limit: usize, waited: String },
    /// As many requests are in flight as `proxy.max_connections`, h2 streams included.
    #[error(
        "{0} requests are in flight, the most the agent takes at once (proxy.max_connections); retry later, or raise proxy.max_connections"
    )]
    Overloaded(u64),
    /// The upstream answered something the agent cannot pass on.
    #[error("the upstream {authority} sent a response the agent cannot forward: {reason}")]
    BadUpstreamResponse { authority: String, reason: String },
    /// The upstream sent no response head within `proxy.upstream_timeout`.
    #[error("the upstream {authority} sent no response within {after} (proxy.upstream_timeout)")]
    UpstreamTimeout { authority: String, after: String },
    /// `Host` (or an absolute-form target) names a host this proxy does not serve.
    #[error("{0}")]
    ForbiddenHost(String),
    /// A browser `Origin` that is not in `proxy.allowed_origins`.
    #[error(
        "requests from origin `{0}` are refused; add it to proxy.allowed_origins if it is trusted"
    )]
    ForbiddenOrigin(String),
    /// A malformed request: a path leaving the upstream's base path, a bad session id, …
    #[error("{0}")]
    BadRequest(String),
    /// Request framing the agent will not pass on (`Transfer-Encoding` other than `chunked`):
    /// answered 400, and the connection closed, since what follows is not read as a request.
    #[error("{0}")]
    BadFraming(String),
    /// `CONNECT`: this is not a forward proxy.
    /// `CONNECT`, `TRACE` or a method no HTTP API uses; says which.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The client's request body broke off or went silent past `idle_timeout` while it was being
    /// sent upstream.
    #[error("the request body could not be read: {reason}")]
    RequestBody { timed_out: bool, reason: String },
    /// A request head over the limits (h2 requests with more than 100 fields).
    #[error("{0}")]
    HeadersTooLarge(String),
    /// `/p/NAME/` names no configured profile.
    #[error("{0}")]
    UnknownProfile(String),
    /// A `[budget]` is spent (SPEC §8); `retry_after` for the hourly one.
    #[error("{message}")]
    BudgetExceeded {
        message: String,
        retry_after: Option<std::time::Duration>,
    },
    /// `proxy.require_key` is on and the request presents no local key in force.
    #[error("{0}")]
    InvalidLocalKey(String),
    /// The local key is bound to another profile than the one the path names.
    #[error("{0}")]
    ForbiddenProfile(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::TokenUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnreachable { .. } | ProxyError::BadUpstreamResponse { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamBusy { .. } | ProxyError::Overloaded(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ForbiddenHost(_) | ProxyError::ForbiddenOrigin(_) => StatusCode::FORBIDDEN,
            ProxyError::BadRequest(_) | ProxyError::BadFraming(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::RequestBody {
                timed_out: true, ..
            } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::RequestBody {
                timed_out: false, ..
            } => StatusCode::BAD_REQUEST,
            ProxyError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BudgetExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::InvalidLocalKey(_) => StatusCode::UNAUTHORIZED,
            ProxyError::ForbiddenProfile(_) => StatusCode::FORBIDDEN,
            ProxyError::UnknownProfile(_) => StatusCode::NOT_FOUND,
        }
    }

    /// The OpenAI error `code`.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::TokenUnavailable(_) => "token_unavailable",
            ProxyError::UpstreamUnreachable { .. } => "upstream_unreachable",
            ProxyError::UpstreamBusy { .. } => "upstream_busy",
            ProxyError::Overloaded(_) => "overloaded",
            ProxyError::BadUpstreamResponse { .. } => "bad_upstream_response",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
            ProxyError::ForbiddenHost(_) => "forbidden_host",
            ProxyError::ForbiddenOrigin(_) => "forbidden_origin",
            ProxyError::BadRequest(_) | ProxyError::BadFraming(_) => "bad_request",
            ProxyError::MethodNotAllowed(_) => "method_not_allowed",
            ProxyError::RequestBody {
                timed_out: true, ..
            } => "request_timeout",
            ProxyError::RequestBody {
                timed_out: false, ..
            } => "bad_request",
            ProxyError::HeadersTooLarge(_) => "request_header_fields_too_large",
            ProxyError::BudgetExceeded { .. } => "budget_exceeded",
            ProxyError::InvalidLocalKey(_) => "invalid_local_key",
            ProxyError::ForbiddenProfile(_) => "forbidden_profile",
            ProxyError::UnknownProfile(_) => "unknown_profile",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let v = serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": "behest_agent_error",
                "code": self.code(),
            }
        });
        Bytes::from(v.to_string())
    }

    /// Which kind of upstream failure this is, for the metrics; `None` when it is not one.
    pub fn upstream_failure(&self) -> Option<&'static str> {
        match self {
            ProxyError::UpstreamUnreachable { .. } => Some("unreachable"),
            ProxyError::UpstreamTimeout { .. } => Some("timeout"),
            ProxyError::UpstreamBusy { .. } => Some("busy"),
            ProxyError::BadUpstreamResponse { .. } => Some("bad_response"),
            _ => None,
        }
    }

    /// The whole answer.
    pub fn response(&self) -> Response<Full<Bytes>> {
        self.response_with(Full::new)
    }

    /// The whole answer, with the JSON body wrapped by `body`.
    pub fn response_with<B>(&self, body: impl FnOnce(Bytes) -> B) -> Response<B> {
        let mut r = Response::new(body(self.body()));
        *r.status_mut() = self.status();
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let ProxyError::BudgetExceeded { retry_after, .. } = self {
            // The OpenAI SDKs retry a 429 (twice, by default), sleeping whatever Retry-After says
            // (an hourly budget's: up to an hour) unless told not to: a budget is there to stop
            // the loop, so the SDK raises at once.
            h.insert("x-should-retry", HeaderValue::from_static("false"));
            if let Some(after) = retry_after {
                h.insert(
                    http::header::RETRY_AFTER,
                    HeaderValue::from(after.as_secs()),
                );
            }
        }
        if matches!(self, ProxyError::BadFraming(_)) {
            h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        if matches!(self, ProxyError::MethodNotAllowed(_)) {
            h.insert(
                http::header::ALLOW,
                HeaderValue::from_static(super::guard::FORWARDED_METHODS),
            );
        }
        r
    }
}

/// Why a [`super::Proxy`] cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "`proxy.upstream` is not set: set it to the Behest base URL (or BEHEST_BASE_URL) to run the proxy"
    )]
    NoUpstream,
    #[error("`proxy.upstream`: {0}")]
    Upstream(String),
    #[error(
        "`proxy.session_id`: `{0}` cannot be sent as X-Session-Id (visible ASCII, at most 128 characters)"
    )]
    SessionId(String),
    #[error("`proxy.ca_file`: {0}")]
    Tls(crate::tls::TlsError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_use_the_openai_shape_with_json_content_type() {
        let e = ProxyError::TokenUnavailable("no valid token is available: the IdP said no".into());
        let r = e.response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["type"], "behest_agent_error");
        assert_eq!(v["error"]["code"], "token_unavailable");
        assert_eq!(
            v["error"]["message"],
            "no valid token is available: the IdP said no"
        );
    }

    #[test]
    fn each_error_maps_to_its_status_and_code() {
        let cases = [
            (
                ProxyError::UpstreamUnreachable {
                    authority: "h".into(),
                    reason: "r".into(),
                },
                502,
                "upstream_unreachable",
            ),
            (
                ProxyError::UpstreamTimeout {
                    authority: "h".into(),
                    after: "1s".into(),
                },
                504,
                "upstream_timeout",
            ),
            (
                ProxyError::UpstreamBusy {
                    limit: 4,
                    waited: "10s".into(),
                },
                503,
                "upstream_busy",
            ),
            (
                ProxyError::BadUpstreamResponse {
                    authority: "h".into(),
                    reason: "r".into(),
                },
                502,
                "bad_upstream_response",
            ),
            (ProxyError::ForbiddenHost("x".into()), 403, "forbidden_host"),
            (
                ProxyError::ForbiddenOrigin("x".into()),
                403,
                "forbidden_origin",
            ),
            (ProxyError::BadRequest("x".into()), 400, "bad_request"),
            (ProxyError::BadFraming("x".into()), 400, "bad_request"),
            (
                ProxyError::MethodNotAllowed(String::new()),
                405,
                "method_not_allowed",
            ),
            (
                ProxyError::RequestBody {
                    timed_out: true,
                    reason: "r".into(),
                },
                408,
                "request_timeout",
            ),
            (
                ProxyError::RequestBody {
                    timed_out: false,
                    reason: "r".into(),
                },
                400,
                "bad_request",
            ),
            (
                ProxyError::HeadersTooLarge("x".into()),
                431,
                "request_header_fields_too_large",
            ),
            (
                ProxyError::BudgetExceeded {
                    message: "m".into(),
                    retry_after: None,
                },
                429,
                "budget_exceeded",
            ),
            (
                ProxyError::InvalidLocalKey("x".into()),
                401,
                "invalid_local_key",
            ),
            (
                ProxyError::ForbiddenProfile("x".into()),
                403,
                "forbidden_profile",
            ),
        ];
        for (e, status, code) in cases {
            assert_eq!(e.status().as_u16(), status, "{e:?}");
            assert_eq!(e.code(), code, "{e:?}");
        }
    }
}
