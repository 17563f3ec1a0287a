//! `behest-agent usage [--session ID] [--json | --format markdown]`: what was spent — the running
//! daemon's counts since it started, else the ledger's (`usage.ledger_file`).

use std::process::ExitCode;

use anyhow::Context;
use http::Method;

use super::{CliResult, Global, daemon, init_cli_logging};
use crate::control::Daemon;
use crate::usage::{Report, ledger};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this session (a CI job's X-Session-Id)
    #[arg(long, value_name = "ID")]
    pub session: Option<String>,
    /// Print JSON: {"since", "totals", "sessions": {ID: {…, "models": {…}}}}
    #[arg(long, conflicts_with = "format")]
    pub json: bool,
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Only the requests that went with this profile ([profiles.NAME]; `default`: [auth])
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One line per session and model
    Text,
    /// A Markdown table (for a CI job's summary)
    Markdown,
    /// The same as --json
    Json,
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    init_cli_logging(g);
    let mut report =
        match fetch_profile(g, args.profile.as_deref(), args.session.as_deref()).await? {
            Some(r) => r,
            None => {
                errln!("no usage recorded yet (no daemon runs, and the ledger is empty or off)");
                Report::default()
            }
        };
    // Nothing counted (no ledger, or not one line of the session): nothing since now.
    if report.since.is_empty() {
        report.since = crate::token::rfc3339(std::time::SystemTime::now());
    }
    let format = if args.json { Format::Json } else { args.format };
    match format {
        Format::Json => outln!("{}", serde_json::to_string_pretty(&report)?),
        Format::Markdown => out!("{}", report.markdown()),
        Format::Text => out!("{}", text(&report)),
    }
    Ok(ExitCode::SUCCESS)
}

/// The daemon's counts, else the ledger's; `None` when neither has any.
pub async fn fetch(g: &Global, session: Option<&str>) -> anyhow::Result<Option<Report>> {
    fetch_profile(g, None, session).await
}

/// [`fetch`], only the requests of `profile` when one is given.
pub async fn fetch_profile(
    g: &Global,
    profile: Option<&str>,
    session: Option<&str>,
) -> anyhow::Result<Option<Report>> {
    let settings = g.load_known_profile(profile)?;
    if let Some(d) = daemon(g, settings.as_ref().ok()).await? {
        let mut uri = match session {
            Some(s) => format!(
                "/v1/usage?session={}",
                url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
            ),
            None => "/v1/usage".to_string(),
        };
        let sep = if uri.contains('?') { "&" } else { "?" };
        uri.push_str(&super::profile_query(sep, profile));
        let body = d
            .request(
                Method::GET,
                &uri,
                Daemon::grant_wait(settings.as_ref().ok()),
            )
            .await?;
        return serde_json::from_value(body)
            .map(Some)
            .context("the daemon's usage answer does not parse");
    }
    // Without a daemon only the ledger's path is needed (not the IdP settings).
    let Some(path) = g.ledger_file()? else {
        return Ok(None);
    };
    let report = ledger::read_only(&path, profile, session)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(report.map(|r| match session {
        Some(s) => r.only(s),
        None => r,
    }))
}

/// Plain text: the totals, then one line per session and model.
fn text(r: &Report) -> String {
    let mut out = format!("since {}: {}\n", r.since, r.line());
    for (session, s) in &r.sessions {
        for (model, c) in &s.models {
            out.push_str(&format!(
                "  {session}  {model}: {} requests, {} tokens ({} prompt + {} completion), {} errors, {} unaccounted\n",
                c.requests, c.total_tokens, c.prompt_tokens, c.completion_tokens, c.errors, c.unaccounted
            ));
        }
    }
    out
}
