//! `behest-agent run`: the daemon in the foreground. Logs to stderr; SIGTERM or SIGINT stop it
//! cleanly (exit 0).

use std::process::ExitCode;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use super::{CliResult, Global};
use crate::app::App;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn run(g: &Global, _args: Args) -> CliResult {
    let settings = g.load()?;
    crate::telemetry::init(
        settings.telemetry.log_format,
        &g.log_level(&settings.telemetry.log_level),
        std::env::var_os("JOURNAL_STREAM").is_some(),
    );
    for w in &settings.warnings {
        tracing::warn!("{w}");
    }
    let app = App::build(settings, crate::clock::system()).await?;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    app.run(shutdown).await;
    Ok(ExitCode::SUCCESS)
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
fn spawn_signal_handler(shutdown: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
                _ = int.recv() => { tracing::info!("SIGINT: stopping"); break; }
                _ = hup.recv() => {
                    tracing::warn!("SIGHUP: configuration reload is not implemented yet; restart the service to apply changes");
                }
            }
        }
        shutdown.cancel();
    });
    Ok(())
}
