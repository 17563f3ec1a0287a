//! `behest-agent run`: the daemon in the foreground. Logs to stderr. SIGHUP reloads the
//! configuration (a broken one is logged and the old one kept); SIGTERM or SIGINT stop accepting,
//! let in-flight requests and streams finish (bounded by `proxy.shutdown_grace`; a grant in flight is
//! abandoned), then exit 0; a second SIGTERM or SIGINT exits at once with status 1.

use std::process::ExitCode;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{CliResult, Global};
use crate::app::{App, Reload};

#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn run(g: &Global, _args: Args) -> CliResult {
    let settings = g.load()?;
    let log = crate::telemetry::init(
        settings.telemetry.log_format,
        &g.log_level(&settings.telemetry.log_level),
        std::env::var_os("JOURNAL_STREAM").is_some(),
    );
    super::release_freed_memory_in_the_background();
    crate::fds::raise_soft_limit();
    for w in settings
        .warnings
        .iter()
        .chain(&crate::fds::warning(&settings.proxy))
    {
        tracing::warn!("{w}");
    }
    let app = App::build(settings, crate::clock::system())
        .await?
        .with_log_handle(log);
    let shutdown = CancellationToken::new();
    let (reload_tx, reload_rx) = mpsc::channel(4);
    spawn_signal_handler(g.clone(), shutdown.clone(), reload_tx)?;
    app.run_with_reloads(shutdown, reload_rx).await;
    Ok(ExitCode::SUCCESS)
}

/// Returns on the first SIGTERM or SIGINT.
pub async fn wait_for_stop_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// SIGTERM/SIGINT cancel `shutdown` (a second one exits at once, with status 1); SIGHUP loads the configuration again and sends it to the app,
/// or logs why it cannot be used.
fn spawn_signal_handler(
    g: Global,
    shutdown: CancellationToken,
    reloads: mpsc::Sender<Reload>,
) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
                _ = int.recv() => { tracing::info!("SIGINT: stopping"); break; }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    let settings = g.load().map_err(|e| e.to_string());
                    if let Ok(settings) = &settings {
                        for w in settings.warnings.iter().chain(&crate::fds::warning(&settings.proxy)) {
                            tracing::warn!("{w}");
                        }
                    }
                    let _ = reloads.send(Reload { settings }).await;
                }
            }
        }
        shutdown.cancel();
        // A second stop signal: whoever sent it will not wait for the requests in flight.
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("a second stop signal: exiting now, cutting the requests still in flight");
        std::process::exit(1);
    });
    Ok(())
}
