//! `behest-agent dev`: the embedded default. Starts an Auth0-compatible IdP and an OpenAI-compatible
//! echo upstream that verifies its tokens like Behest does (both from the `devkit` crate, served by
//! [`server::serve`]), runs the agent against both, and prints what to try. No account, no config
//! file needed (one given with `--config` applies, but for its IdP, upstream, profiles and fleet);
//! the machine's configuration and token cache are not touched.
//!
//! The agent's control socket is where `status`, `token` and the other commands look for a daemon
//! by default, so they find a dev agent with no flag or variable. When that socket cannot be used
//! (another agent answers there), dev takes a private one and says how to reach it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow};
use devkit::idp::{Idp, IdpOptions};
use devkit::upstream::{Upstream, UpstreamOptions};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{CliResult, Global};
use crate::app::{App, StartError};
use crate::config::{self, ListenAddr, LoadOptions, Settings};
use crate::keys::NewKey;
use crate::server::{self, Limits, Listener};

/// The API identifier the embedded IdP issues tokens for.
pub const DEV_AUDIENCE: &str = "https://api.behest.dev";
/// The embedded IdP's one client.
pub const DEV_CLIENT_ID: &str = "dev-client";

/// The limits of the IdP and the upstream: a local server's, with room for as many connections
/// as the proxy in front of the upstream accepts by default.
const DEV_LIMITS: Limits = Limits {
    max_connections: 4096,
    ..Limits::LOCAL
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the proxy listens (127.0.0.1:0 picks a free port)
    #[arg(long, default_value = "127.0.0.1:8711", value_name = "ADDR")]
    pub listen: String,
    /// Lifetime of the tokens the embedded IdP issues
    #[arg(long, default_value = "1h", value_name = "DURATION", value_parser = token_ttl)]
    pub token_ttl: Duration,
    /// Send one chat completion (plain and streamed) through the proxy, print it and exit
    #[arg(long)]
    pub check: bool,
}

/// The longest token lifetime Auth0 issues.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

fn token_ttl(s: &str) -> Result<Duration, String> {
    match super::parse_lifetime(s)? {
        d if d > MAX_TOKEN_TTL => Err(format!(
            "`{s}` is longer than 30 days, the longest lifetime Auth0 issues"
        )),
        d => Ok(d),
    }
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    crate::telemetry::init(config::LogFormat::Text, &g.log_level("info"), false);
    super::release_freed_memory_in_the_background();
    // The IdP, the upstream and the proxy all take descriptors from this one process.
    crate::fds::raise_soft_limit();
    let servers = CancellationToken::new();
    let _stop_servers = servers.clone().drop_guard();
    let secret = random_secret();

    let listener = loopback().await.context("starting the embedded IdP")?;
    let mut idp_opts = IdpOptions::new(DEV_CLIENT_ID, secret.clone(), DEV_AUDIENCE);
    idp_opts.token_ttl = args.token_ttl;
    let idp = Idp::new(listener.local_addr()?, idp_opts);
    let service = idp.service();
    tokio::spawn(server::serve(
        vec![Listener::Tcp(listener)],
        DEV_LIMITS,
        move |_| service.clone(),
        servers.clone(),
    ));

    let listener = loopback().await.context("starting the echo upstream")?;
    let upstream = Upstream::new(
        listener.local_addr()?,
        UpstreamOptions::for_idp(&idp, DEV_AUDIENCE),
    );
    let service = upstream.service(servers.clone());
    tokio::spawn(server::serve(
        vec![Listener::Tcp(listener)],
        DEV_LIMITS,
        move |_| service.clone(),
        servers.clone(),
    ));

    let runtime_dir = tempfile::Builder::new()
        .prefix("behest-agent-dev")
        .tempdir()
        .context("creating a runtime directory")?;
    let default_socket = g.control_socket()?;
    let mut env: HashMap<String, String> = HashMap::new();
    // Over the file (`--config`), under `--set`.
    for (k, v) in [
        ("BEHEST_AGENT_CLIENT_SECRET", secret),
        ("BEHEST_AGENT__TOKEN__CACHE_FILE", String::new()),
        // Counted in memory (`usage` shows it), never in the machine's ledger.
        ("BEHEST_AGENT__USAGE__LEDGER_FILE", String::new()),
        // Keys made for this run (with proxy.require_key) go with it, never into the machine's
        // keys file.
        (
            "BEHEST_AGENT__PROXY__KEYS_FILE",
            runtime_dir.path().join("keys.json").display().to_string(),
        ),
        (LISTEN_VAR, args.listen.clone()),
        (
            "BEHEST_AGENT__CONTROL__SOCKET",
            default_socket.display().to_string(),
        ),
    ] {
        env.insert(k.to_string(), v);
    }
    // Where the user's private directory is, so a default socket there gets it created 0700.
    let process = super::process_env();
    for k in ["HOME", "XDG_STATE_HOME"] {
        if let Some(v) = process.get(k) {
            env.insert(k.to_string(), v.clone());
        }
    }
    // The file (`--config`, never the machine's default one) applies, validated as for `run`,
    // except what names the IdP, the upstream and a fleet: those are the embedded ones, or none.
    let (idp_url, upstream_url) = (idp.base_url(), upstream.base_url());
    let settings = config::load_adjusted(
        &LoadOptions {
            path: g.config_path(),
            default_path: None,
            env,
            overrides: g.set.clone(),
        },
        |m| {
            m.auth = config::file::AuthFile {
                domain: Some(idp_url),
                audience: Some(DEV_AUDIENCE.to_string()),
                client_id: Some(DEV_CLIENT_ID.to_string()),
                ..Default::default()
            };
            m.profiles.clear();
            m.fleet = Default::default();
            m.token.uid_claim = None;
            m.token.expected_uid = None;
            m.token.uid_check = None;
            m.token.required_claims = None;
            m.proxy.upstream = Some(upstream_url);
            m.proxy.allow_insecure_upstream = Some(true);
        },
    )
    .map_err(listen_error)?;
    // The banner's URLs and `--check` are on a TCP address.
    if !settings
        .proxy
        .listen
        .iter()
        .any(|a| matches!(a, ListenAddr::Tcp(_)))
    {
        return Err(config::ConfigError::Invalid {
            file: "value set by --listen".to_string(),
            key: "proxy.listen".to_string(),
            message: "dev needs a TCP address, such as 127.0.0.1:0".to_string(),
        }
        .into());
    }
    let require_key = settings.proxy.require_key;
    let (app, socket, socket_note) =
        build(settings, &runtime_dir.path().join("agent.sock")).await?;
    let tokens = app.tokens();
    let keys = app.keys();
    let proxy_addr = app.proxy_addresses().into_iter().find_map(|a| match a {
        ListenAddr::Tcp(sa) => Some(sa),
        ListenAddr::Unix(_) => None,
    });
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run(shutdown.clone()));
    tokens
        .get(Duration::ZERO)
        .await
        .map_err(|e| anyhow!("the embedded IdP did not issue a token: {e}"))?;
    let Some(proxy_addr) = proxy_addr else {
        return Err(anyhow!("dev needs a TCP --listen address").into());
    };
    let base = format!("http://{proxy_addr}/v1");

    if args.check {
        // With proxy.require_key, the check's requests carry a key of their own.
        let key = match &keys {
            Some(k) => Some(
                k.create(NewKey {
                    name: Some("dev --check".into()),
                    ttl: Some(Duration::from_secs(300)),
                    ..NewKey::default()
                })
                .context("making a key for the check")?
                .0,
            ),
            None => None,
        };
        let result = self_check(&base, key.as_deref().unwrap_or("placeholder")).await;
        shutdown.cancel();
        let _ = running.await;
        return result.map(|()| ExitCode::SUCCESS).map_err(Into::into);
    }

    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "behest-agent".into());
    // With the socket where the CLI looks by default, the commands need nothing more.
    let cli = match &socket_note {
        None => exe,
        Some(_) => format!("BEHEST_AGENT__CONTROL__SOCKET={} {exe}", socket.display()),
    };
    let note = socket_note
        .map(|n| format!("\n  ({n})"))
        .unwrap_or_default();
    outln!(
        "behest-agent dev: the agent, an embedded Auth0-compatible IdP and an echo upstream, all in this process.

  IdP (Auth0-compatible)   {idp}/  client {DEV_CLIENT_ID}, audience {DEV_AUDIENCE}
  Upstream (OpenAI echo)   {up}/v1  (checks the bearer's signature, uid, tid, pid like Behest)
  Proxy                    {base}
  Control socket           {sock}{note}

Try, in another terminal:
{try_requests}
  {cli} status
  {cli} usage
  {cli} token

Ctrl-C stops it.",
        idp = idp.base_url(),
        up = upstream.base_url(),
        sock = socket.display(),
        try_requests = try_requests(&base, &cli, require_key),
    );
    // A signal, or `behest-agent stop` (which cancels `shutdown` over the control socket).
    tokio::select! {
        () = super::run::wait_for_stop_signal() => {}
        () = shutdown.cancelled() => {}
    }
    shutdown.cancel();
    let _ = running.await;
    Ok(ExitCode::SUCCESS)
}

/// The variable dev passes `--listen` in.
const LISTEN_VAR: &str = "BEHEST_AGENT__PROXY__LISTEN";

/// A `proxy.listen` error names `--listen`, which gave the value (not the variable dev passes it
/// in).
fn listen_error(e: config::ConfigError) -> config::ConfigError {
    let by_var = format!("value set by environment variable {LISTEN_VAR}");
    match e {
        config::ConfigError::Invalid { file, key, message } if file == by_var => {
            config::ConfigError::Invalid {
                file: "value set by --listen".to_string(),
                key,
                message,
            }
        }
        config::ConfigError::Parse { file, message } if file == by_var => {
            config::ConfigError::Parse {
                file: "value set by --listen".to_string(),
                message,
            }
        }
        e => e,
    }
}

/// The banner's requests to try: with `proxy.require_key`, each needs a key from `key create`.
fn try_requests(base: &str, cli: &str, require_key: bool) -> String {
    let plain = r#"{"model":"echo-1","messages":[{"role":"user","content":"hello"}]}"#;
    let streamed =
        r#"{"model":"echo-1","stream":true,"messages":[{"role":"user","content":"hello"}]}"#;
    if require_key {
        return format!(
            "
  (proxy.require_key is set: every request needs a local key)
  KEY=$({cli} key create --name dev)
  curl -s {base}/chat/completions -H \"Authorization: Bearer $KEY\" -H 'Content-Type: application/json' \\
    -d '{plain}'
  curl -sN {base}/chat/completions -H \"Authorization: Bearer $KEY\" -H 'Content-Type: application/json' \\
    -d '{streamed}'
  OPENAI_BASE_URL={base} OPENAI_API_KEY=$KEY python3 your_script.py"
        );
    }
    format!(
        "
  curl -s {base}/chat/completions -H 'Content-Type: application/json' \\
    -d '{plain}'
  curl -sN {base}/chat/completions -H 'Content-Type: application/json' \\
    -d '{streamed}'
  OPENAI_BASE_URL={base} OPENAI_API_KEY=placeholder python3 your_script.py"
    )
}

/// `127.0.0.1` on a free port.
async fn loopback() -> std::io::Result<TcpListener> {
    TcpListener::bind(("127.0.0.1", 0)).await
}

/// Builds the agent with its control socket where `settings` put it (the CLI's default). When
/// that fails (another agent answers there, or it cannot be created), builds it with `private`
/// instead and adds a note saying why. Returns the socket used.
async fn build(
    settings: Settings,
    private: &Path,
) -> anyhow::Result<(App, PathBuf, Option<String>)> {
    let wanted = settings.control.socket.clone();
    let mut fallback = settings.clone();
    let error = match App::build(settings, crate::clock::system()).await {
        Err(StartError::Control { error, .. }) => error,
        built => return Ok((built.map_err(start_error)?, wanted, None)),
    };
    fallback.control.socket = private.to_path_buf();
    let app = App::build(fallback, crate::clock::system())
        .await
        .map_err(start_error)?;
    let why = match error.kind() {
        std::io::ErrorKind::AddrInUse => "another agent answers there".to_owned(),
        _ => error.to_string(),
    };
    let note = format!(
        "not the default {}: {why}; the commands below name this one",
        wanted.display()
    );
    Ok((app, private.to_path_buf(), Some(note)))
}

fn start_error(e: StartError) -> anyhow::Error {
    match e {
        StartError::Listen { .. } | StartError::Bind(_) => anyhow!(
            "{e}\n(is another agent or `dev` running? pick a free port with --listen 127.0.0.1:0)"
        ),
        e => e.into(),
    }
}

fn random_secret() -> String {
    let mut bytes = [0u8; 24];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system RNG works");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One plain and one streamed chat completion through the proxy, as a client would send them.
async fn self_check(base: &str, key: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .context("building the check client")?;
    let body = serde_json::json!({"model": "echo-1", "messages": [{"role": "user", "content": "hello from behest-agent dev"}]});
    let resp = client
        .post(format!("{base}/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .context("sending a chat completion through the proxy")?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        return Err(anyhow!("the proxy answered {status}: {text}"));
    }
    outln!("POST {base}/chat/completions -> {status}\n{text}");
    let mut streamed = body.clone();
    streamed["stream"] = serde_json::Value::Bool(true);
    let resp = client
        .post(format!("{base}/chat/completions"))
        .bearer_auth(key)
        .json(&streamed)
        .send()
        .await
        .context("sending a streamed chat completion through the proxy")?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() || !text.contains("data: [DONE]") {
        return Err(anyhow!("the streamed completion failed ({status}): {text}"));
    }
    outln!(
        "POST {base}/chat/completions (stream) -> {status}, {} events",
        text.matches("data: ").count()
    );
    Ok(())
}
