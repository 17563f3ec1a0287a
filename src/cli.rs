//! The command line: clap models the arguments (one file per subcommand), [`main`] runs the chosen
//! command and maps its error to an exit code — 0 ok, 1 failure, 2 usage or configuration error —
//! printing the whole cause chain.

/// `print!` for a command's output: a reader that went away (`| head`) ends it quietly, and any
/// other failure to write is the command's error (`print!` would panic on either).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*))?
    };
}

/// [`out!`] with a newline.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*)))?
    };
}

/// A line on stderr. A stderr that cannot be written (closed, full, its reader gone) loses the
/// line, never the command's outcome: `eprintln!` would panic.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod dev;
pub mod doctor;
pub mod env;
pub mod exec;
pub mod key;
pub mod refresh;
pub mod run;
pub mod session;
pub mod status;
pub mod stop;
pub mod token;
pub mod usage;
pub mod wait;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::config::{self, ConfigError, Settings};
use crate::control::{ControlError, Daemon};

#[derive(Debug, Parser)]
#[command(
    name = "behest-agent",
    version,
    about = "Machine-to-machine access to Behest: token agent and loopback OpenAI proxy",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand accepts, before or after its name.
#[derive(Debug, Clone, clap::Args)]
pub struct Global {
    /// Config file [default: /etc/behest-agent/config.toml when it exists]; empty: the default
    #[arg(long, global = true, env = "BEHEST_AGENT_CONFIG", value_name = "PATH")]
    config: Option<std::ffi::OsString>,
    /// Log level or filter (overrides telemetry.log_level)
    #[arg(long, global = true, value_name = "LEVEL", value_parser = parse_log_level)]
    pub log_level: Option<String>,
    /// More logging (-v info, -vv debug)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Override a config key, e.g. --set proxy.listen=127.0.0.1:9000 (repeatable)
    #[arg(long = "set", global = true, value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub set: Vec<(String, String)>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (token refresher and control API)
    Run(run::Args),
    /// Print a valid access token (from the daemon, else a one-shot grant using the disk cache)
    Token(token::Args),
    /// Show the token's state, the last refresh and error (never the token)
    Status(status::Args),
    /// Force a new grant now
    Refresh(refresh::Args),
    /// Print the environment a job needs to use the proxy (OPENAI_BASE_URL, …)
    Env(env::Args),
    /// Run a command with that environment (using the daemon, or an in-process proxy)
    Exec(exec::Args),
    /// Run everything on an embedded IdP, with no accounts needed
    Dev(dev::Args),
    /// Show what was spent: requests and tokens per session and model
    Usage(usage::Args),
    /// Check the configuration, the IdP, the token's claims and the upstream, with the fix for each problem
    Doctor(doctor::Args),
    /// Wait until the daemon answers on its control socket and holds a valid token (for CI scripts)
    Wait(wait::Args),
    /// Local keys for a shared proxy (proxy.require_key): create, list, revoke
    Key(key::Args),
    /// Stop the running daemon as SIGTERM does (requests in flight finish) and wait until it has exited
    Stop(stop::Args),
    /// Print shell completions
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
}

/// The one parser of the CLI's duration flags: seconds (`90`) or a duration (`90s`, `30m`,
/// `12h`), as the control API reads them.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    crate::control::server::parse_ttl(s)
        .ok_or_else(|| format!("`{s}` is not a duration: use e.g. 90s, 30m or 12h"))
}

/// [`parse_duration`] for a lifetime (a key's `--ttl`, a token's): zero is refused, as what it
/// makes would be expired already.
pub fn parse_lifetime(s: &str) -> Result<std::time::Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!(
            "`{s}` is no time at all: what it is for would expire at once; use e.g. 90s, 30m or 12h"
        )),
        d => Ok(d),
    }
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))?;
    Ok((k.trim().to_string(), v.to_string()))
}

impl Global {
    fn load_options(&self) -> config::LoadOptions {
        config::LoadOptions {
            path: self.config_path(),
            default_path: Some(PathBuf::from(config::DEFAULT_PATH)),
            env: process_env(),
            overrides: self.set.clone(),
        }
    }

    /// Loads the settings from the file, the process environment and `--set`.
    pub fn load(&self) -> Result<Settings, ConfigError> {
        config::load(&self.load_options())
    }

    /// [`Global::load`], as the profile `profile` (`None`: `default`); an unknown profile is a
    /// configuration error naming the configured ones.
    pub fn load_profile(&self, profile: Option<&str>) -> Result<Settings, ConfigError> {
        let settings = self.load()?;
        let name = profile.unwrap_or(config::DEFAULT_PROFILE);
        settings.profile(name).ok_or_else(|| {
            let known: Vec<&str> = std::iter::once(config::DEFAULT_PROFILE)
                .chain(settings.profiles.keys().map(String::as_str))
                .collect();
            ConfigError::invalid(
                settings.path.as_deref(),
                "--profile",
                format!(
                    "no profile `{}` is configured (profiles: {}); add [profiles.{}] or use one of those",
                    name.escape_debug(),
                    known.join(", "),
                    name.escape_debug()
                ),
            )
        })
    }

    /// [`Global::load_profile`], except that a configuration that loads but has no such profile
    /// is an error now (the others leave the CLI to find a daemon without its settings).
    pub fn load_known_profile(
        &self,
        profile: Option<&str>,
    ) -> Result<Result<Settings, ConfigError>, ConfigError> {
        match self.load_profile(profile) {
            Err(ConfigError::Invalid { key, .. }) if key == "--profile" => {
                Err(self.load_profile(profile).unwrap_err())
            }
            other => Ok(other),
        }
    }

    /// The config file named by `--config` or `BEHEST_AGENT_CONFIG` (an empty one, as an unset CI
    /// variable gives, names none).
    pub fn config_path(&self) -> Option<PathBuf> {
        self.config
            .clone()
            .filter(|c| !c.is_empty())
            .map(PathBuf::from)
    }

    /// The proxy's listen addresses, needing nothing else of the configuration.
    pub fn proxy_listen(&self) -> Result<Vec<config::ListenAddr>, ConfigError> {
        config::proxy_listen(&self.load_options())
    }

    /// `usage.ledger_file`, needing nothing else of the configuration.
    pub fn ledger_file(&self) -> Result<Option<PathBuf>, ConfigError> {
        config::ledger_file(&self.load_options())
    }

    /// `proxy.keys_file`, needing nothing else of the configuration.
    pub fn keys_file(&self) -> Result<Option<PathBuf>, ConfigError> {
        config::keys_file(&self.load_options())
    }

    /// `proxy.require_key`, needing nothing else of the configuration.
    pub fn require_key(&self) -> Result<bool, ConfigError> {
        config::require_key(&self.load_options())
    }

    /// The control socket to look for a daemon on, even when the settings do not validate.
    pub fn control_socket(&self) -> Result<PathBuf, ConfigError> {
        config::control_socket(&self.load_options())
    }

    /// The log filter for a command whose default is `default`.
    pub fn log_level(&self, default: &str) -> String {
        if let Some(l) = &self.log_level {
            return l.clone();
        }
        match self.verbose {
            0 => default.to_string(),
            1 => "info".to_string(),
            _ => "debug".to_string(),
        }
    }
}

fn parse_log_level(s: &str) -> Result<String, String> {
    config::check_log_filter(s).map(|()| s.to_string())
}

/// Writes a command's output on stdout (see [`out!`]).
pub fn write_out(text: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::anyhow!("cannot write the output: {e}"))
        }
        _ => Ok(()),
    }
}

/// The process environment as a map (read once, at the edge). A variable whose name or value is
/// not UTF-8 is left out: none of the agent's can be so (one that looks like its own is named on
/// stderr, once), and a CI job may inherit any bytes in another.
pub fn process_env() -> HashMap<String, String> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    std::env::vars_os()
        .filter_map(|(k, v)| match (k.into_string(), v.into_string()) {
            (Ok(k), Ok(v)) => Some((k, v)),
            // (`BEHEST_AGENT_CONFIG` is `--config`'s, which takes any path.)
            (Ok(k), Err(_))
                if (k.starts_with("BEHEST_") || k.starts_with("AUTH0_"))
                    && k != "BEHEST_AGENT_CONFIG" =>
            {
                WARNED.call_once(|| {
                    errln!("warning: {k} is ignored: its value is not UTF-8");
                });
                None
            }
            _ => None,
        })
        .collect()
}

/// A failure with its exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        let error = e.into();
        let usage = error.downcast_ref::<ConfigError>().is_some()
            || error
                .downcast_ref::<ControlError>()
                .is_some_and(ControlError::is_usage);
        let code = if usage { 2 } else { 1 };
        Failure { code, error }
    }
}

pub type CliResult = Result<ExitCode, Failure>;

/// The binary's entry point.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::tls::install_default_provider();
    // One event-loop thread, as nginx with one worker: the proxy's requests, the refresher and
    // the control socket share it without cross-thread wake-ups (measured: up to 19% more
    // requests per second than a one-worker multi-thread runtime). Blocking file work goes to
    // tokio's blocking pool.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            errln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(dispatch(cli));
    // Do not wait for lingering blocking tasks (a stdin reader, a file lock) at exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(code) => code,
        Err(f) => {
            errln!("error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}

async fn dispatch(cli: Cli) -> CliResult {
    let g = cli.global;
    match cli.command {
        Command::Run(a) => run::run(&g, a).await,
        Command::Token(a) => token::run(&g, a).await,
        Command::Status(a) => status::run(&g, a).await,
        Command::Refresh(a) => refresh::run(&g, a).await,
        Command::Env(a) => env::run(&g, a).await,
        Command::Exec(a) => exec::run(&g, a).await,
        Command::Dev(a) => dev::run(&g, a).await,
        Command::Doctor(a) => doctor::run(&g, a).await,
        Command::Usage(a) => usage::run(&g, a).await,
        Command::Wait(a) => wait::run(&g, a).await,
        Command::Stop(a) => stop::run(&g, a).await,
        Command::Key(a) => key::run(&g, a).await,
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "behest-agent", &mut script);
            let mut script = String::from_utf8_lossy(&script).into_owned();
            if shell == clap_complete::Shell::Bash {
                // clap_complete's bash script spells the states of a hyphenated binary's
                // subcommands two ways, so none of their options completed
                // (clap-rs/clap#6421).
                script = script.replace("behest__subcmd__agent", "behest__agent");
            }
            out!("{script}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// For the long-running commands: lets jemalloc (the binary's allocator) purge freed memory from
/// its background thread, so the daemon's RSS falls back within seconds after a burst even when it
/// then sits idle; without the thread it purges only while it allocates. Short commands skip it.
pub fn release_freed_memory_in_the_background() {
    if let Err(error) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::debug!(%error, "jemalloc's background thread is not available");
    }
}

/// Sets up logging for a short CLI command (warnings only unless asked).
pub fn init_cli_logging(g: &Global) {
    crate::telemetry::init(config::LogFormat::Text, &g.log_level("warn"), false);
}

/// `SEP` + `profile=NAME` for a control API call about `profile`; empty for none.
pub fn profile_query(sep: &str, profile: Option<&str>) -> String {
    match profile {
        Some(p) => format!(
            "{sep}profile={}",
            url::form_urlencoded::byte_serialize(p.as_bytes()).collect::<String>()
        ),
        None => String::new(),
    }
}

/// The running daemon every command uses, found the one way: on the socket of `settings` (else the
/// socket the file, the environment or `--set` name, even when the rest of the configuration does
/// not validate: a client needs only the socket; but never a guess when the file cannot be read
/// or parsed), served by this user, root or the service's user,
/// and — with `settings` — serving their identity. `Ok(None)` when no daemon runs there.
pub async fn daemon(
    g: &Global,
    settings: Option<&Settings>,
) -> Result<Option<Daemon>, ControlError> {
    let socket = match settings {
        Some(s) => s.control.socket.clone(),
        None => g.control_socket().map_err(ControlError::Config)?,
    };
    Daemon::connect(&socket, settings).await
}

/// [`daemon`] for a command about `profile` (`None`: `default`): a daemon that does not serve it
/// is refused here, before the command makes anything (a key, a grant), as a usage error naming
/// the daemon's profiles.
pub async fn profile_daemon(
    g: &Global,
    settings: Option<&Settings>,
    profile: Option<&str>,
) -> Result<Option<Daemon>, ControlError> {
    let daemon = daemon(g, settings).await?;
    if let Some(d) = &daemon {
        d.check_profile(profile)?;
    }
    Ok(daemon)
}
