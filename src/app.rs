//! The daemon assembled: the token engine, its refresher and the control API, started from settings
//! and stopped by a cancellation token. `behest-agent run`, `dev` and the tests all start it here.

use std::time::SystemTime;

use serde_json::json;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::SharedClock;
use crate::config::Settings;
use crate::control::{self, ControlState};
use crate::token::{TokenSource, rfc3339};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot set up the IdP client: {0}")]
    Client(String),
    #[error("cannot bind the control socket {path}: {source}")]
    Control {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A built daemon, listeners bound, not yet running.
pub struct App {
    pub settings: Settings,
    pub tokens: TokenSource,
    control: UnixListener,
}

impl App {
    /// Builds the token engine (loading the disk cache) and binds the control socket.
    pub async fn build(settings: Settings, clock: SharedClock) -> Result<App, StartError> {
        let tokens = TokenSource::new(&settings, clock).map_err(StartError::Client)?;
        let control = control::bind(&settings.control.socket, settings.control.socket_mode)
            .await
            .map_err(|source| StartError::Control {
                path: settings.control.socket.display().to_string(),
                source,
            })?;
        tokens.load_cache().await;
        Ok(App {
            settings,
            tokens,
            control,
        })
    }

    /// Runs until `shutdown`, then stops everything it started.
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let daemon = json!({
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "started_at": rfc3339(SystemTime::now()),
            "control_socket": self.settings.control.socket.display().to_string(),
            "upstream": self.settings.proxy.upstream.as_ref().map(|u| u.to_string()),
            "listen": self.settings.proxy.listen.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
        });
        let state = ControlState {
            tokens: self.tokens.clone(),
            daemon,
            live: None,
        };
        let tokens = self.tokens.clone();
        let s = shutdown.clone();
        tracker.spawn(async move { tokens.run(s).await });
        tracker.spawn(control::serve(self.control, state, shutdown.clone()));
        tracing::info!(
            control = %self.settings.control.socket.display(),
            "behest-agent running"
        );
        shutdown.cancelled().await;
        tracker.close();
        tracker.wait().await;
        let _ = std::fs::remove_file(&self.settings.control.socket);
        tracing::info!("behest-agent stopped");
    }
}
