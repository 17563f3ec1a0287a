//! `behest-agent refresh`: forces one new grant now (the daemon's, or in-process without one) and
//! exits 1 with the IdP's error when it fails. One attempt, no retry loop.

use std::process::ExitCode;

use anyhow::anyhow;
use http::Method;

use super::{CliResult, Global, init_cli_logging, profile_daemon};
use crate::control::Daemon;
use crate::token::{TokenSource, rfc3339};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The profile to refresh ([profiles.NAME]; default: [auth])
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    init_cli_logging(g);
    let settings = g.load_known_profile(args.profile.as_deref())?;
    match profile_daemon(g, settings.as_ref().ok(), args.profile.as_deref()).await? {
        Some(d) => {
            let wait = Daemon::grant_wait(settings.as_ref().ok());
            let uri = format!(
                "/v1/refresh{}",
                super::profile_query("?", args.profile.as_deref())
            );
            let body = d
                .request(Method::POST, &uri, wait)
                .await
                .map_err(|e| anyhow!("refresh failed: {e}"))?;
            let pointer = match &args.profile {
                Some(p) => format!("/profiles/{p}/token/expires_at"),
                None => "/token/expires_at".to_string(),
            };
            let exp = body
                .pointer(&pointer)
                .and_then(|v| v.as_str())
                .unwrap_or("?");
            outln!("refreshed by the daemon; the new token expires at {exp}");
        }
        None => {
            let settings = settings?;
            let source =
                TokenSource::new(&settings, crate::clock::system()).map_err(|e| anyhow!(e))?;
            let t = source
                .refresh_now()
                .await
                .map_err(|e| anyhow!("refresh failed: {e}"))?;
            outln!(
                "refreshed (no daemon running; cached on disk); the new token expires at {}",
                rfc3339(t.expires_at)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
