//! `behest-agent token`: prints a valid token for shell scripts. Asks the running daemon; without one,
//! does a one-shot grant in-process, sharing the disk cache under its file lock so that parallel jobs
//! make one grant. Prints nothing on stdout unless it succeeds.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use http::Method;
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use super::{CliResult, Global, daemon, init_cli_logging};
use crate::control::Daemon;
use crate::token::{TokenSource, rfc3339};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The printed token stays valid at least this long (e.g. 60s, 10m)
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub min_ttl: Option<Duration>,
    /// Print JSON with expires_at and the Behest claims
    #[arg(long, conflicts_with = "header")]
    pub json: bool,
    /// Print the whole `Authorization: Bearer …` header line
    #[arg(long)]
    pub header: bool,
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    init_cli_logging(g);
    let min_ttl = args.min_ttl.unwrap_or_default();
    let settings = g.load();
    let doc = match daemon(g, settings.as_ref().ok()).await? {
        Some(d) => {
            let uri = format!("/v1/token?min_ttl={}", min_ttl.as_secs());
            let wait = Daemon::grant_wait(settings.as_ref().ok());
            d.request(Method::GET, &uri, wait).await?
        }
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
        println!("{doc}");
    } else if args.header {
        println!("Authorization: Bearer {token}");
    } else {
        println!("{token}");
    }
    Ok(ExitCode::SUCCESS)
}
