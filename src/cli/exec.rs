//! `behest-agent exec [--session ID] -- CMD…`: runs CMD with the proxy's environment. Uses the running
//! daemon's proxy when there is one; otherwise serves an in-process proxy on an ephemeral loopback
//! port (and a private control socket, so `behest-agent token` inside CMD works) for CMD's lifetime.
//! Forwards signals to CMD and exits with its status (128+N when a signal N ended it).

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use super::env::{base_url, variables};
use super::{CliResult, Global, daemon, init_cli_logging, process_env};
use crate::app::App;
use crate::config::{self, ListenAddr, LoadOptions};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Attribute the command's cost to this session (base URL /s/ID/v1, sent as X-Session-Id)
    #[arg(long, value_name = "ID")]
    pub session: Option<String>,
    /// The command and its arguments
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    init_cli_logging(g);
    let mut env: Vec<(String, String)> = Vec::new();
    let shutdown = CancellationToken::new();
    let mut own_agent = None;
    let mut _runtime_dir = None;

    let settings = g.load();
    let addr = if let Some(d) = daemon(g, settings.as_ref().ok()).await? {
        super::env::proxy_address(g, Some(&d))?
    } else {
        // No daemon: our own agent for the command's lifetime, on an ephemeral port.
        let dir = tempfile::Builder::new()
            .prefix("behest-agent-exec")
            .tempdir()
            .context("creating a runtime directory")?;
        let socket = dir.path().join("agent.sock");
        let mut overrides = g.set.clone();
        overrides.push(("proxy.listen".into(), "127.0.0.1:0".into()));
        overrides.push(("control.socket".into(), socket.display().to_string()));
        let settings = config::load(&LoadOptions {
            path: g.config.clone(),
            default_path: Some(config::DEFAULT_PATH.into()),
            env: process_env(),
            overrides,
        })?;
        if settings.proxy.upstream.is_none() {
            return Err(anyhow::anyhow!(
                "no daemon is running and proxy.upstream is not set: set it (or BEHEST_BASE_URL), or start `behest-agent run`"
            )
            .into());
        }
        let app = App::build(settings, crate::clock::system()).await?;
        let addr = app
            .proxy_addresses()
            .into_iter()
            .find_map(|a| match a {
                ListenAddr::Tcp(a) => Some(a.to_string()),
                ListenAddr::Unix(_) => None,
            })
            .context("the in-process proxy has no TCP listener")?;
        env.push((
            "BEHEST_AGENT__CONTROL__SOCKET".into(),
            socket.display().to_string(),
        ));
        own_agent = Some(tokio::spawn(app.run(shutdown.clone())));
        _runtime_dir = Some(dir);
        addr
    };
    let base = base_url(&addr, args.session.as_deref())?;
    env.extend(
        variables(&base)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
    );
    // `behest-agent token` inside the command reads the configuration this command was given
    // (the CLI refuses an agent serving another identity than its configuration's); what exec
    // sets itself comes later and wins.
    let mut given: Vec<(String, String)> = g
        .set
        .iter()
        .map(|(k, v)| {
            let var = format!("BEHEST_AGENT__{}", k.replace('.', "__").to_uppercase());
            (var, v.clone())
        })
        .collect();
    if let Some(c) = &g.config {
        given.push(("BEHEST_AGENT_CONFIG".into(), c.display().to_string()));
    }
    env.splice(0..0, given);

    let status = run_child(&args.command, env.into_iter().collect()).await;
    shutdown.cancel();
    if let Some(agent) = own_agent {
        let _ = tokio::time::timeout(Duration::from_secs(5), agent).await;
    }
    let code = status?;
    Ok(ExitCode::from(code))
}

/// Runs the command, forwarding SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to it; its
/// exit code, or 128 + the signal that ended it.
async fn run_child(command: &[String], env: HashMap<String, String>) -> anyhow::Result<u8> {
    let mut child = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .envs(env)
        .spawn()
        .with_context(|| format!("cannot run `{}`", command[0]))?;
    let pid = Pid::from_raw(child.id().context("the command has no pid")? as i32);
    let kinds = [
        (SignalKind::terminate(), Signal::SIGTERM),
        (SignalKind::interrupt(), Signal::SIGINT),
        (SignalKind::hangup(), Signal::SIGHUP),
        (SignalKind::quit(), Signal::SIGQUIT),
        (SignalKind::user_defined1(), Signal::SIGUSR1),
        (SignalKind::user_defined2(), Signal::SIGUSR2),
    ];
    let forwarders = CancellationToken::new();
    for (kind, sig) in kinds {
        let mut stream = signal(kind).context("installing a signal handler")?;
        let stop = forwarders.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = stream.recv() => {
                        if r.is_none() { return; }
                        let _ = kill(pid, sig);
                    }
                }
            }
        });
    }
    let status = child.wait().await.context("waiting for the command")?;
    forwarders.cancel();
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c.clamp(0, 255) as u8,
        (None, Some(s)) => (128 + s).clamp(0, 255) as u8,
        _ => 1,
    })
}
