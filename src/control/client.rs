//! The control API client used by the CLI: one HTTP/1.1 request per connection over the Unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// A connection target: the daemon's control socket.
#[derive(Debug, Clone)]
pub struct ControlClient {
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the daemon's control socket {path} failed: {message}")]
    Io { path: String, message: String },
}

impl ControlClient {
    /// `Some` when a daemon answers on `path`; `None` when there is no daemon (no socket, or a
    /// stale one nobody listens on).
    pub async fn connect(path: &Path) -> Option<ControlClient> {
        match tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::UnixStream::connect(path),
        )
        .await
        {
            Ok(Ok(_)) => Some(ControlClient {
                path: path.to_path_buf(),
            }),
            _ => None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request; returns the status and the JSON body.
    pub async fn call(
        &self,
        method: Method,
        uri: &str,
    ) -> Result<(StatusCode, Value), ControlError> {
        let io_err = |message: String| ControlError::Io {
            path: self.path.display().to_string(),
            message,
        };
        let stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|e| io_err(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| io_err(e.to_string()))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header(http::header::HOST, "behest-agent")
            .body(Full::new(Bytes::new()))
            .expect("a control request builds");
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| io_err(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| io_err(e.to_string()))?
            .to_bytes();
        let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok((status, value))
    }
}

/// The `error.message` of an error body, or a fallback.
pub fn error_message(body: &Value, status: StatusCode) -> String {
    body.pointer("/error/message")
        .and_then(Value::as_str)
        .map(String::from)
        .unwrap_or_else(|| format!("the daemon answered HTTP {}", status.as_u16()))
}
