//! Logs: `tracing` to stderr as text, JSON, or (auto) journald-friendly text without timestamps when
//! stderr is the journal. The level can be changed at run time (reload). Nothing here formats a
//! secret; callers never pass one. Metrics live in [`metrics`].

pub mod metrics;

pub use metrics::Metrics;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Changes the log filter of the installed subscriber.
#[derive(Clone)]
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, tracing_subscriber::Registry>,
}

impl LogHandle {
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        crate::config::check_log_filter(level)?;
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        self.filter.reload(filter).map_err(|e| e.to_string())
    }
}

/// Installs the global subscriber. `under_journal`: stderr is connected to journald
/// (`JOURNAL_STREAM` set), which timestamps lines itself.
pub fn init(format: LogFormat, level: &str, under_journal: bool) -> LogHandle {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let result = match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Auto if under_journal => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .without_time()
                    .with_ansi(false)
                    .with_target(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Auto | LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_target(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
    LogHandle { filter: handle }
}
