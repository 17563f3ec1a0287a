//! `behest-agent exec [--session ID] -- CMD…`: runs CMD with the proxy's environment. Uses the running
//! daemon's proxy when there is one; otherwise serves an in-process proxy on an ephemeral loopback
//! port (and a private control socket, so `behest-agent token` inside CMD works) for CMD's lifetime.
//! Runs CMD in its own process group, forwards signals to it and exits with its status (128+N when
//! a signal N ended it; 127 / 126 when CMD is not found / cannot be run).

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use std::io::IsTerminal;
use std::os::unix::process::ExitStatusExt;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, killpg, pthread_sigmask};
use nix::unistd::{Pid, getpgrp, tcsetpgrp};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use super::env::variables;
use super::{CliResult, Failure, Global, init_cli_logging, process_env, profile_daemon};
use crate::app::App;
use crate::config::{self, ListenAddr, LoadOptions};
use crate::keys::NewKey;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Attribute the command's cost to this session (base URL /s/ID/v1, sent as X-Session-Id);
    /// default: from the CI job's variables (proxy.session_from_ci)
    #[arg(long, value_name = "ID", value_parser = super::env::parse_session)]
    pub session: Option<String>,
    /// Use this profile's identity ([profiles.NAME]): the base URL gets /p/NAME/
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
    /// When the proxy requires local keys: the longest the command's key stays valid. It is
    /// revoked when the command exits; this bounds one left behind by an exec killed with SIGKILL
    #[arg(long, value_name = "DUR", default_value = "12h", value_parser = super::parse_lifetime)]
    pub ttl: std::time::Duration,
    /// The command and its arguments
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<std::ffi::OsString>,
    /// Do not print the session's usage when the command exits (nor append it to
    /// $GITHUB_STEP_SUMMARY)
    #[arg(long)]
    pub no_summary: bool,
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    init_cli_logging(g);
    let mut env: Vec<(String, String)> = Vec::new();
    let shutdown = CancellationToken::new();
    let mut own_agent = None;
    let mut own_accounting = None;
    let mut _runtime_dir = None;

    let settings = g.load_known_profile(args.profile.as_deref())?;
    let mut key_daemon = None;
    let mut own_keys = None;
    let addr = if let Some(d) =
        profile_daemon(g, settings.as_ref().ok(), args.profile.as_deref()).await?
    {
        let addr = super::env::proxy_address(g, Some(&d))?;
        key_daemon = Some(d);
        addr
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
            path: g.config_path(),
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
        own_accounting = Some(app.accounting());
        own_keys = app.keys();
        let tokens = app.profile_tokens(args.profile.as_deref());
        own_agent = Some(tokio::spawn(app.run(shutdown.clone())));
        // A grant of the command's profile that only a configuration change fixes (a wrong
        // secret) fails the command before it runs, as the GitHub Action and the GitLab template
        // do; any other failure is the proxy's to retry while the command runs.
        if let Some(tokens) = tokens
            && let Err(e) = tokens.get(Duration::ZERO).await
            && tokens.needs_a_fix()
        {
            return Err(anyhow::anyhow!("{e}").into());
        }
        _runtime_dir = Some(dir);
        addr
    };
    let session = super::session::for_command(g, args.session.as_deref());
    let base = super::env::base_url_for(&addr, args.profile.as_deref(), session.as_deref())?;
    env.extend(
        variables(&base, &super::process_env())
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
    );
    // A proxy that requires keys: one for this command, bound to its session, revoked when it
    // exits (however it exits: the child is waited for, signals and all, before the revoke), and
    // expiring after `--ttl` should this process be killed before it can revoke it.
    let job_key = super::key::job_key(
        key_daemon.as_ref(),
        own_keys,
        NewKey {
            name: Some(format!("exec {}", std::process::id())),
            profile: args.profile.clone(),
            session: session.clone(),
            ttl: Some(args.ttl),
        },
    )
    .await
    .context("making the command's local key")?;
    if let Some((_, _, key)) = &job_key {
        env.push(("OPENAI_API_KEY".into(), key.clone()));
    }
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
    if let Some(c) = &g.config_path() {
        // Absolute: the command may change directory before it runs `behest-agent`.
        let c = std::path::absolute(c).unwrap_or_else(|_| c.clone());
        given.push(("BEHEST_AGENT_CONFIG".into(), c.display().to_string()));
    }
    env.splice(0..0, given);

    let status = run_child(&args.command, env.into_iter().collect()).await;
    if let Some((place, id, _)) = &job_key
        && let Err(e) = place.revoke(id).await
    {
        errln!(
            "behest-agent: the command's local key {id} could not be revoked ({e:#}); revoke it with `behest-agent key revoke {id}`"
        );
    }
    if !args.no_summary {
        // The session the command's requests went with: the URL's, else the configured one.
        let session = session
            .clone()
            .or_else(|| g.load().ok().and_then(|s| s.proxy.session_id))
            .unwrap_or_else(|| crate::usage::NO_SESSION.to_string());
        let session = session.as_str();
        let report = match &own_accounting {
            Some(accounting) => Ok(Some(accounting.report())),
            None => super::usage::fetch(g, Some(session)).await,
        };
        match report {
            Ok(Some(report)) => summarize(&report.only(session), session),
            Ok(None) => {}
            Err(e) => tracing::warn!("cannot get the session's usage: {e:#}"),
        }
    }
    shutdown.cancel();
    if let Some(agent) = own_agent {
        let _ = tokio::time::timeout(Duration::from_secs(5), agent).await;
    }
    let code = status?;
    Ok(ExitCode::from(code))
}

/// How long what is left of the command's process group has, after the command exits, between
/// SIGTERM and SIGKILL.
const GROUP_GRACE: Duration = Duration::from_secs(5);

/// Runs the command in its own process group, as a shell runs a job: signals are forwarded to the
/// whole group (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2), and when stdin is a terminal
/// the group becomes its foreground group, so Ctrl-C reaches the command once (from the terminal)
/// and an interactive command can read. When the command exits, what it left running in its group
/// gets SIGTERM, then SIGKILL after [`GROUP_GRACE`] — before the proxy they use goes away.
/// Returns the command's exit code, or 128 + the signal that ended it; 127 when the command is not
/// found and 126 when it cannot be run, as a shell says.
async fn run_child(
    command: &[std::ffi::OsString],
    env: HashMap<String, String>,
) -> Result<u8, Failure> {
    let mut child = match tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .envs(env)
        .process_group(0)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            let name = command[0].to_string_lossy();
            let (code, error) = if e.kind() == std::io::ErrorKind::NotFound {
                let place = if name.contains('/') {
                    "no such file"
                } else {
                    "not found on PATH"
                };
                (127, anyhow::anyhow!("cannot run `{name}`: {place}"))
            } else {
                (
                    126,
                    anyhow::Error::new(e).context(format!("cannot run `{name}`")),
                )
            };
            return Err(Failure { code, error });
        }
    };
    let group = Pid::from_raw(child.id().context("the command has no pid")? as i32);
    let terminal = std::io::stdin().is_terminal().then(std::io::stdin);
    if let Some(tty) = &terminal {
        // It may have stopped on reading the terminal before it was given it.
        if tcsetpgrp(tty, group).is_ok() {
            let _ = killpg(group, Signal::SIGCONT);
        }
    }
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
                        let _ = killpg(group, sig);
                    }
                }
            }
        });
    }
    let status = child.wait().await.context("waiting for the command")?;
    forwarders.cancel();
    if let Some(tty) = &terminal {
        take_back(tty);
    }
    end_group(group).await;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c.clamp(0, 255) as u8,
        (None, Some(s)) => (128 + s).clamp(0, 255) as u8,
        _ => 1,
    })
}

/// Makes this process's group the terminal's foreground group again. From the background that
/// raises SIGTTOU unless blocked, so it is blocked around the call (one thread: the runtime's).
fn take_back(tty: &std::io::Stdin) {
    let ttou = SigSet::from(Signal::SIGTTOU);
    let mut before = SigSet::empty();
    if pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&ttou), Some(&mut before)).is_ok() {
        let _ = tcsetpgrp(tty, getpgrp());
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&before), None);
    }
}

/// SIGTERM to what is left of the command's group; SIGKILL to what is still there after
/// [`GROUP_GRACE`].
async fn end_group(group: Pid) {
    if killpg(group, Signal::SIGTERM).is_err() {
        return; // nobody left
    }
    let deadline = tokio::time::Instant::now() + GROUP_GRACE;
    while tokio::time::Instant::now() < deadline {
        if killpg(group, None).is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = killpg(group, Signal::SIGKILL);
}

/// The session's usage on stderr, and as a Markdown table in `$GITHUB_STEP_SUMMARY` when set.
fn summarize(report: &crate::usage::Report, session: &str) {
    if session == crate::usage::NO_SESSION {
        // Not this command's alone: every request without a session since the daemon started.
        errln!(
            "behest-agent: requests without a session (every client's, not only this command's; give --session ID to count it alone): {}",
            report.line()
        );
    } else {
        errln!("behest-agent: session {session}: {}", report.line());
    }
    if let Some(path) = std::env::var_os("GITHUB_STEP_SUMMARY").filter(|p| !p.is_empty()) {
        // After a blank line: what the job wrote before may not end its last line.
        let table = format!("\n### Behest usage\n\n{}\n", report.markdown());
        let written = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, table.as_bytes()));
        if let Err(e) = written {
            tracing::warn!(path = %std::path::Path::new(&path).display(), "cannot append to GITHUB_STEP_SUMMARY: {e}");
        }
    }
}
