//! `behest-agent wait [--timeout DUR]`: for a script that has just started the daemon in the
//! background. Exits 0 as soon as the daemon answers on its control socket and holds a valid
//! token (its `/readyz`), 1 at the timeout with the last reason it was not ready on stderr, or
//! at once when the daemon's grant failed in a way only a configuration change fixes (a wrong
//! secret: waiting longer would not help), when this user may not use the daemon's socket, or
//! when the process `--pid` names has exited. Polls every [`POLL`], the last time at the timeout.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use http::{Method, StatusCode};
use serde_json::Value;
use tokio::time::{Instant, sleep, timeout};

use super::{CliResult, Global, daemon, init_cli_logging};
use crate::control::ControlError;

/// Time between two polls.
const POLL: Duration = Duration::from_millis(100);
/// Bound on one poll, whatever the timeout.
const ATTEMPT: Duration = Duration::from_secs(2);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Give up after this long (e.g. 30s, 2m); a grant refused for a reason only a
    /// configuration change fixes (a wrong secret) ends the wait at once
    #[arg(long, default_value = "30s", value_name = "DUR", value_parser = super::parse_duration)]
    pub timeout: Duration,
    /// The daemon's process id (`$!` where the script started it): the wait ends at once when
    /// that process has exited (a configuration it refused), rather than at the timeout
    #[arg(long, value_name = "PID", value_parser = clap::value_parser!(i32).range(1..))]
    pub pid: Option<i32>,
}

/// Whether process `pid` has exited (gone, or a zombie not yet reaped).
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold anything.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| matches!(state, 'Z' | 'X')),
        Err(_) => true,
    }
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    init_cli_logging(g);
    // A configuration that does not load names no socket to wait on: a usage error, at once.
    let socket = g.control_socket()?;
    let deadline = Instant::now() + args.timeout;
    let mut last = "the control socket did not answer in time".to_string();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // The last poll, at the deadline, still gets one POLL to be answered.
        match timeout(left.max(POLL).min(ATTEMPT), ready(g, &socket)).await {
            Ok(Ok(())) => return Ok(ExitCode::SUCCESS),
            Ok(Err(NotReady::Fix(error))) => return Err(error.into()),
            Ok(Err(NotReady::Yet(reason))) => last = reason,
            Err(_) if left > ATTEMPT => {
                last = format!("the control socket did not answer within {ATTEMPT:?}")
            }
            // Cut short by the deadline: the reason before it stands.
            Err(_) => {}
        }
        if let Some(pid) = args.pid.filter(|p| exited(*p)) {
            return Err(anyhow!(
                "the daemon (pid {pid}) has exited before it was ready: its log says why ({last})"
            )
            .into());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(anyhow!(
                "the daemon was not ready within {}: {last}",
                humantime::format_duration(args.timeout)
            )
            .into());
        }
        sleep(POLL.min(deadline - now)).await;
    }
}

/// Why the daemon is not ready.
enum NotReady {
    /// Not yet: another poll may find it ready.
    Yet(String),
    /// Its grant failed in a way only a configuration change fixes, or this user may not use it.
    Fix(anyhow::Error),
}

/// `Ok` when the daemon answers and holds a valid token; otherwise why not.
async fn ready(g: &Global, socket: &std::path::Path) -> Result<(), NotReady> {
    let settings = g.load().ok();
    let Some(d) = daemon(g, settings.as_ref()).await.map_err(|e| match e {
        // Only a change of permissions or configuration helps these, not time.
        ControlError::Denied { .. }
        | ControlError::Untrusted { .. }
        | ControlError::Unidentified { .. }
        | ControlError::OtherIdentity { .. }
        | ControlError::UnsafeAddress { .. }
        | ControlError::Config(_) => NotReady::Fix(e.into()),
        e => NotReady::Yet(e.to_string()),
    })?
    else {
        return Err(NotReady::Yet(format!(
            "no daemon answers on {} (start `behest-agent run`, or point --config / BEHEST_AGENT__CONTROL__SOCKET at its socket)",
            socket.display()
        )));
    };
    let (status, body) = d
        .call(Method::GET, "/readyz", ATTEMPT)
        .await
        .map_err(|e| NotReady::Yet(e.to_string()))?;
    if status == StatusCode::OK {
        return Ok(());
    }
    let state = body.get("token").and_then(Value::as_str).unwrap_or("none");
    Err(match body.get("last_error").and_then(Value::as_str) {
        Some(e) if body["needs_a_fix"] == true => NotReady::Fix(anyhow!(
            "the daemon's grant failed and will keep failing until the configuration is fixed (token {state}; last error: {e})"
        )),
        Some(e) => NotReady::Yet(format!(
            "the daemon holds no valid token (token {state}; last error: {e})"
        )),
        None => NotReady::Yet(format!(
            "the daemon holds no valid token yet (token {state})"
        )),
    })
}
