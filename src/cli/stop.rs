//! `behest-agent stop [--timeout DUR]`: asks the daemon on the control socket to stop as on
//! SIGTERM (`POST /v1/shutdown`: no new connections, in-flight requests and streams finish within
//! `proxy.shutdown_grace`) and waits until it has exited. Exit 0 once it has, 1 when no daemon
//! answers or it is still running at the timeout.
//!
//! "Exited" is judged on the process that listens on the socket (its pid from the socket's peer
//! credentials, checked against its start time so a reused pid is not mistaken for it; a zombie
//! counts as exited). When that pid cannot be known — a daemon in another pid namespace — it is
//! judged on the socket no longer answering.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use http::{Method, StatusCode};
use tokio::time::{Instant, sleep, timeout};

use super::{CliResult, Global, daemon, init_cli_logging};
use crate::control::Daemon;
use crate::control::client::error_message;

/// Time between two looks at whether the daemon is gone.
const POLL: Duration = Duration::from_millis(50);
/// Bound on one request to the control socket.
const ATTEMPT: Duration = Duration::from_secs(5);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Give up waiting for the daemon to exit after this long (e.g. 60s); it should exceed the
    /// daemon's proxy.shutdown_grace (default 30s)
    #[arg(long, default_value = "60s", value_name = "DUR", value_parser = super::parse_duration)]
    pub timeout: Duration,
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    init_cli_logging(g);
    let settings = g.load().ok();
    let Some(d) = daemon(g, settings.as_ref()).await? else {
        let socket = g.control_socket()?;
        return Err(anyhow!("no daemon answers on {}: nothing to stop", socket.display()).into());
    };
    let socket = d.path().to_path_buf();
    let process = Process::listening_on(&socket).await;
    let (status, body) = d.call(Method::POST, "/v1/shutdown", ATTEMPT).await?;
    if status != StatusCode::ACCEPTED {
        return Err(anyhow!(
            "the daemon refused to stop: {} (send it SIGTERM instead)",
            error_message(&body, status)
        )
        .into());
    }
    let who = match &process {
        Some(p) => format!("behest-agent (pid {})", p.pid),
        None => format!("the behest-agent on {}", socket.display()),
    };
    let deadline = Instant::now() + args.timeout;
    loop {
        let gone = match &process {
            Some(p) => !p.alive(),
            None => !matches!(Daemon::connect(&socket, None).await, Ok(Some(_))),
        };
        if gone {
            outln!("{who} stopped");
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() >= deadline {
            return Err(anyhow!(
                "{who} is still running {} after it was asked to stop: it is finishing the requests in flight (up to proxy.shutdown_grace) and exits by itself. Its control socket is already closed, so another `stop` finds nothing to stop; to wait for it, give `stop` a longer --timeout next time",
                humantime::format_duration(args.timeout)
            )
            .into());
        }
        sleep(POLL).await;
    }
}

/// The daemon's process as this machine's `/proc` shows it.
struct Process {
    pid: i32,
    /// Field 22 of `/proc/PID/stat`: tells this process from a later one with the same pid.
    started: String,
}

impl Process {
    /// The process that listens on `socket`, when its pid is visible here.
    async fn listening_on(socket: &Path) -> Option<Process> {
        let stream = timeout(ATTEMPT, tokio::net::UnixStream::connect(socket))
            .await
            .ok()?
            .ok()?;
        let pid = stream.peer_cred().ok()?.pid()?;
        // 0: the peer is in a pid namespace this one cannot see.
        if pid <= 0 {
            return None;
        }
        let (_, started) = stat(pid)?;
        Some(Process { pid, started })
    }

    /// Still running: present, the same process, and neither a zombie nor dead.
    fn alive(&self) -> bool {
        match stat(self.pid) {
            Some((state, started)) => started == self.started && !matches!(state, 'Z' | 'X'),
            None => false,
        }
    }
}

/// The state letter and start time of `pid`, from `/proc/PID/stat`.
fn stat(pid: i32) -> Option<(char, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (the state); the start time is field 22.
    let state = fields.first()?.chars().next()?;
    let started = fields.get(22 - 3)?.to_string();
    Some((state, started))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_reused_pid_is_not_taken_for_it() {
        let me = std::process::id() as i32;
        let (state, started) = stat(me).expect("/proc/self/stat reads");
        assert!(state == 'R' || state == 'S', "{state}");
        let p = Process { pid: me, started };
        assert!(p.alive());
        let other = Process {
            pid: me,
            started: "1".to_string(),
        };
        assert!(!other.alive(), "another start time is another process");
    }
}
