//! `behest-agent token`: prints a valid token for shell scripts. Asks the running daemon; without one,
//! does a one-shot grant in-process, sharing the disk cache under its file lock so that parallel jobs
//! make one grant. A daemon that does not answer (it is stopping or restarting) counts as none; a
//! daemon that answers with a refusal does not. Prints nothing on stdout unless it succeeds.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use http::Method;
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use super::{CliResult, Global, init_cli_logging, profile_daemon};
use crate::control::Daemon;
use crate::control::client::ControlError;
use crate::token::{TokenSource, rfc3339};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The printed token stays valid at least this long (e.g. 60s, 10m)
    #[arg(long, value_name = "DURATION", value_parser = super::parse_duration)]
    pub min_ttl: Option<Duration>,
    /// Print JSON with expires_at and the Behest claims
    #[arg(long, conflicts_with = "header")]
    pub json: bool,
    /// Print the whole `Authorization: Bearer …` header line
    #[arg(long)]
    pub header: bool,
    /// The profile whose token to use ([profiles.NAME]; default: [auth])
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    init_cli_logging(g);
    let min_ttl = args.min_ttl.unwrap_or_default();
    let settings = g.load_known_profile(args.profile.as_deref())?;
    let from_daemon = match profile_daemon(g, settings.as_ref().ok(), args.profile.as_deref()).await
    {
        Ok(Some(d)) => {
            let uri = format!(
                "/v1/token?min_ttl={}{}",
                min_ttl.as_secs(),
                super::profile_query("&", args.profile.as_deref())
            );
            let wait = Daemon::grant_wait(settings.as_ref().ok());
            match d.request(Method::GET, &uri, wait).await {
                Ok(doc) => Some(doc),
                Err(e) if daemon_absent(&e) => {
                    // Stopping or restarting between the probe and the call: the disk cache and a
                    // one-shot grant serve instead, as with no daemon.
                    tracing::info!("{e}; getting the token without the daemon");
                    None
                }
                // The daemon answered and refused, or is not one to trust: that stands.
                Err(e) => return Err(anyhow!(e).into()),
            }
        }
        Ok(None) => None,
        Err(e) if daemon_absent(&e) => {
            tracing::info!("{e}; getting the token without the daemon");
            None
        }
        Err(e) => return Err(anyhow!(e).into()),
    };
    let doc = match from_daemon {
        Some(doc) => doc,
        None => {
            let settings = settings?;
            let source =
                TokenSource::new(&settings, crate::clock::system()).map_err(|e| anyhow!(e))?;
            let t = source.get(min_ttl).await?;
            let now = source.clock().now();
            json!({
                "access_token": t.secret().expose_secret(),
                "token_type": "Bearer",
                "expires_at": rfc3339(t.expires_at),
                "expires_in": t.remaining(now).as_secs(),
                "claims": t.claims.view(),
            })
        }
    };
    let token = doc
        .get("access_token")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("the daemon's answer has no access_token"))?;
    if args.json {
        outln!("{doc}");
    } else if args.header {
        outln!("Authorization: Bearer {token}");
    } else {
        outln!("{token}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The daemon did not answer at all (gone, or going, between the probe and the call), as opposed to
/// answering with a refusal. Every kind of control error must be placed on one side or the other.
fn daemon_absent(e: &ControlError) -> bool {
    match e {
        ControlError::NoAnswer { .. } | ControlError::Io { .. } => true,
        ControlError::Denied { .. }
        | ControlError::Untrusted { .. }
        | ControlError::Unidentified { .. }
        | ControlError::OtherIdentity { .. }
        | ControlError::Invalid { .. }
        | ControlError::UnsafeAddress { .. }
        | ControlError::UnknownProfile { .. }
        | ControlError::Refused { .. }
        | ControlError::Config(_) => false,
    }
}
