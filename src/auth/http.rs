//! The IdP's HTTP client, and the adapter that lets `oauth2` use it while keeping what `oauth2` drops:
//! the response status and the `Retry-After` / `x-ratelimit-reset` headers. TLS is rustls with the
//! project's one provider; redirects are never followed; a proxy only as [`crate::egress`] says.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::HeaderMap;

use crate::tls;

/// Builds the reqwest client used for the token endpoint, discovery and JWKS.
pub fn client(
    timeout: Duration,
    ca_file: Option<&std::path::Path>,
    egress: &crate::egress::Egress,
) -> Result<reqwest::Client, String> {
    let mut tls = tls::client_config(ca_file).map_err(|e| e.to_string())?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut builder = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .redirect(reqwest::redirect::Policy::none())
        // Never the environment's proxies on reqwest's own terms: `egress` says which.
        .no_proxy();
    for proxy in egress.reqwest() {
        builder = builder.proxy(proxy);
    }
    if !egress.is_direct() {
        // A connection kept to a proxy may be closed under it (tinyproxy closes after each
        // request without saying so): the IdP's few requests each take a new one.
        builder = builder.pool_max_idle_per_host(0);
    }
    builder
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("behest-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())
}

/// What the adapter saw of the last response.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub status: u16,
    pub retry_after: Option<Duration>,
}

/// A transport failure, described without the request (whose body may hold a secret).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0}")]
    Failed(String),
    /// The IdP answered, with a body over [`MAX_BODY`]: a malformed answer, not an IdP out of
    /// reach.
    #[error("{TOO_LARGE}")]
    TooLarge,
}

const TOO_LARGE: &str = "response body over 256 KiB";

/// Upper bound on a response from the IdP (token endpoint, discovery, JWKS) that we read.
const MAX_BODY: usize = 256 * 1024;

/// `response`'s body, at most 256 KiB: an IdP (or what answers in its place) cannot make the agent
/// hold more.
pub async fn body(mut response: reqwest::Response) -> Result<Vec<u8>, TransportError> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| TransportError::Failed(describe_reqwest(&e)))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(TransportError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `oauth2`'s HTTP client: the project's reqwest client, recording what `oauth2` drops.
#[derive(Clone)]
pub struct Adapter {
    pub client: reqwest::Client,
    pub meta: Arc<Mutex<Option<ResponseMeta>>>,
    pub now: SystemTime,
}

impl<'c> oauth2::AsyncHttpClient<'c> for Adapter {
    type Error = TransportError;
    type Future =
        Pin<Box<dyn Future<Output = Result<oauth2::HttpResponse, TransportError>> + Send + 'c>>;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { send(&this.client, &this.meta, this.now, request).await })
    }
}

/// Sends one `oauth2` request with `client`, recording the status and wait hint in `meta`.
async fn send(
    client: &reqwest::Client,
    meta: &Mutex<Option<ResponseMeta>>,
    now: SystemTime,
    request: oauth2::HttpRequest,
) -> Result<oauth2::HttpResponse, TransportError> {
    let request =
        reqwest::Request::try_from(request).map_err(|e| TransportError::Failed(e.to_string()))?;
    let response = client
        .execute(request)
        .await
        .map_err(|e| TransportError::Failed(describe_reqwest(&e)))?;
    let status = response.status();
    let retry_after = wait_hint(response.headers(), now);
    *meta.lock().expect("meta lock") = Some(ResponseMeta {
        status: status.as_u16(),
        retry_after,
    });
    let mut out = http::Response::builder().status(status);
    if let Some(h) = out.headers_mut() {
        *h = response.headers().clone();
    }
    let body = body(response).await?;
    out.body(body)
        .map_err(|e| TransportError::Failed(e.to_string()))
}

/// `reqwest`'s errors, without the URL's query (there is none of ours) and with the cause chain.
pub fn describe_reqwest(e: &reqwest::Error) -> String {
    let mut msg = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "connection failed".to_string()
    } else if e.is_redirect() {
        "redirected (redirects are not followed)".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        // hyper-util's "client error (Connect)" only repeats what `msg` says.
        if !text.starts_with("client error (") {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg.push_str(crate::tls::tls_hint(e));
    if msg.ends_with("tunnel error: unsuccessful") {
        msg.push_str(crate::egress::CONNECT_REFUSED);
    }
    msg
}

/// The longest wait honoured: a wrong clock or a hostile answer cannot stop refreshes for longer.
pub const MAX_WAIT_HINT: Duration = Duration::from_secs(3600);

/// `Retry-After` (seconds or an HTTP date), else Auth0's `x-ratelimit-reset` (a Unix time) on 429:
/// a time is read against the response's own `Date` when it has one (an IdP whose clock is off
/// means the wait it wrote), in whole seconds, at most [`MAX_WAIT_HINT`].
pub fn wait_hint(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let now = headers
        .get(http::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_http_date(v.trim()).ok())
        .unwrap_or(now);
    let until = |at: SystemTime| {
        let d = at.duration_since(now).unwrap_or_default();
        Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0))
    };
    let wait = if let Some(v) = headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        if let Ok(secs) = v.parse::<u64>() {
            Duration::from_secs(secs)
        } else {
            until(
                humantime::parse_rfc3339_weak(v)
                    .or_else(|_| parse_http_date(v))
                    .ok()?,
            )
        }
    } else {
        let reset = headers
            .get("x-ratelimit-reset")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())?;
        // A reset beyond what time can hold is no hint at all.
        until(crate::clock::from_unix(reset)?)
    };
    Some(wait.min(MAX_WAIT_HINT))
}

/// IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
fn parse_http_date(s: &str) -> Result<SystemTime, ()> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return Err(());
    }
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[2])
    .ok_or(())?
        + 1;
    let iso = format!("{}-{:02}-{}T{}Z", parts[3], month, parts[1], parts[4]);
    humantime::parse_rfc3339(&iso).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_date_and_ratelimit_reset_are_understood() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut h = HeaderMap::new();
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(wait_hint(&h, now), Some(Duration::from_secs(7)));

        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            "Mon, 12 Jan 1970 13:46:50 GMT".parse().unwrap(),
        );
        assert_eq!(wait_hint(&h, now), Some(Duration::from_secs(10)));

        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-reset", "1000030".parse().unwrap());
        assert_eq!(wait_hint(&h, now), Some(Duration::from_secs(30)));

        assert_eq!(wait_hint(&HeaderMap::new(), now), None);

        // A date is read against the response's own Date (the IdP's clock two hours ahead).
        let mut h = HeaderMap::new();
        h.insert("date", "Mon, 12 Jan 1970 15:46:40 GMT".parse().unwrap());
        h.insert(
            "retry-after",
            "Mon, 12 Jan 1970 15:47:00 GMT".parse().unwrap(),
        );
        assert_eq!(wait_hint(&h, now), Some(Duration::from_secs(20)));
        // In whole seconds, and at most an hour.
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-reset", "1000030".parse().unwrap());
        let late = now + Duration::from_millis(400);
        assert_eq!(wait_hint(&h, late), Some(Duration::from_secs(30)));
        let mut h = HeaderMap::new();
        h.insert("retry-after", "999999".parse().unwrap());
        assert_eq!(wait_hint(&h, now), Some(MAX_WAIT_HINT));
    }
}
