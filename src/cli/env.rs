//! `behest-agent env`: prints what a job needs to use the proxy — `OPENAI_BASE_URL`, `OPENAI_API_KEY`
//! (a placeholder the agent replaces) and the older `OPENAI_API_BASE` — in the shell's syntax. The
//! address is the running daemon's, else the configured `proxy.listen`; the session is `--session`,
//! else the CI job's ([`super::session`]). Nothing else of the configuration is read, so it works
//! before the IdP is configured.

use std::process::ExitCode;

use http::Method;
use serde_json::Value;

use super::{CliResult, Global, daemon_for, init_cli_logging};
use crate::config::ListenAddr;

/// The `OPENAI_API_KEY` value: SDKs insist on one; the proxy drops it and injects the real token.
pub const PLACEHOLDER_KEY: &str = "placeholder";

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// export NAME='value'
    Sh,
    /// set -gx NAME 'value'
    Fish,
    /// NAME=value
    Dotenv,
    /// NAME=value lines for `>> "$GITHUB_ENV"`
    Github,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, value_enum, default_value = "sh")]
    pub format: Format,
    /// Attribute the job's cost to this session (base URL /s/ID/v1, sent as X-Session-Id);
    /// default: from the CI job's variables (proxy.session_from_ci)
    #[arg(long, value_name = "ID")]
    pub session: Option<String>,
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    init_cli_logging(g);
    let addr = proxy_address(g).await?;
    let session = super::session::for_command(g, args.session.as_deref());
    let base = base_url(&addr, session.as_deref())?;
    print!("{}", render(args.format, &variables(&base)));
    Ok(ExitCode::SUCCESS)
}

/// The proxy's address: the daemon's first TCP listener, else the configuration's `proxy.listen`
/// (nothing else of the configuration is needed, so this works with none at all).
pub async fn proxy_address(g: &Global) -> anyhow::Result<String> {
    if let Some(client) = daemon_for(g).await
        && let Ok((_, status)) = client.call(Method::GET, "/v1/status").await
        && let Some(addr) = status
            .pointer("/daemon/listen")
            .and_then(Value::as_array)
            .and_then(|l| {
                l.iter()
                    .filter_map(Value::as_str)
                    .find(|a| !a.starts_with("unix:"))
            })
    {
        return Ok(addr.to_string());
    }
    g.proxy_listen()?
        .iter()
        .find_map(|l| match l {
            ListenAddr::Tcp(a) => Some(a.to_string()),
            ListenAddr::Unix(_) => None,
        })
        .ok_or_else(|| anyhow::anyhow!("proxy.listen has no TCP address for OPENAI_BASE_URL"))
}

/// `http://ADDR/v1`, or `http://ADDR/s/SESSION/v1`.
pub fn base_url(addr: &str, session: Option<&str>) -> anyhow::Result<String> {
    match session {
        None => Ok(format!("http://{addr}/v1")),
        Some(s) => {
            if s.is_empty()
                || s.len() > 128
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
            {
                anyhow::bail!(
                    "--session `{s}`: use 1 to 128 letters, digits, '-', '_', '.' or '~' (it becomes part of a URL path)"
                );
            }
            Ok(format!("http://{addr}/s/{s}/v1"))
        }
    }
}

pub fn variables(base: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OPENAI_BASE_URL", base.to_string()),
        ("OPENAI_API_BASE", base.to_string()),
        ("OPENAI_API_KEY", PLACEHOLDER_KEY.to_string()),
    ]
}

pub fn render(format: Format, vars: &[(&str, String)]) -> String {
    let mut out = String::new();
    for (k, v) in vars {
        let line = match format {
            Format::Sh => format!("export {k}='{v}'\n"),
            Format::Fish => format!("set -gx {k} '{v}';\n"),
            Format::Dotenv | Format::Github => format!("{k}={v}\n"),
        };
        out.push_str(&line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_format_renders_the_three_variables() {
        let vars = variables("http://127.0.0.1:8711/v1");
        assert_eq!(
            render(Format::Sh, &vars),
            "export OPENAI_BASE_URL='http://127.0.0.1:8711/v1'\nexport OPENAI_API_BASE='http://127.0.0.1:8711/v1'\nexport OPENAI_API_KEY='placeholder'\n"
        );
        assert_eq!(
            render(Format::Fish, &vars).lines().next().unwrap(),
            "set -gx OPENAI_BASE_URL 'http://127.0.0.1:8711/v1';"
        );
        assert_eq!(
            render(Format::Dotenv, &vars).lines().last().unwrap(),
            "OPENAI_API_KEY=placeholder"
        );
        assert_eq!(render(Format::Github, &vars), render(Format::Dotenv, &vars));
    }

    #[test]
    fn a_session_goes_into_the_path_and_unsafe_ones_are_refused() {
        assert_eq!(
            base_url("127.0.0.1:8711", Some("run-42")).unwrap(),
            "http://127.0.0.1:8711/s/run-42/v1"
        );
        assert!(base_url("127.0.0.1:8711", Some("a/b")).is_err());
        assert!(base_url("127.0.0.1:8711", Some("x'; rm -rf /")).is_err());
    }
}
