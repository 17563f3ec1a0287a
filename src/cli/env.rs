//! `behest-agent env`: prints what a job needs to use the proxy — `OPENAI_BASE_URL`, `OPENAI_API_KEY`
//! (a placeholder the agent replaces) and the older `OPENAI_API_BASE` — in the shell's syntax,
//! quoted so that `eval` takes each value literally. The address is the running daemon's (a
//! loopback one only), else the configured `proxy.listen`; the session is `--session`, else the
//! CI job's ([`super::session`]). Nothing else of the configuration is needed, so it works before
//! the IdP is configured.

use std::collections::HashMap;
use std::process::ExitCode;

use super::{CliResult, Global, init_cli_logging, profile_daemon};
use crate::config::ListenAddr;
use crate::control::Daemon;
use crate::keys::{KeyStore, NewKey};

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
    #[arg(long, value_name = "ID", value_parser = parse_session)]
    pub session: Option<String>,
    /// When the proxy requires local keys: how long the key made for this job (printed as
    /// OPENAI_API_KEY) stays valid
    #[arg(long, value_name = "DUR", default_value = "12h", value_parser = super::parse_lifetime)]
    pub ttl: std::time::Duration,
    /// Use this profile's identity ([profiles.NAME]): the base URL gets /p/NAME/
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    init_cli_logging(g);
    let settings = profile_settings(g, args.profile.as_deref())?;
    let daemon = profile_daemon(g, settings.as_ref(), args.profile.as_deref()).await?;
    let addr = proxy_address(g, daemon.as_ref())?;
    let session = super::session::for_command(g, args.session.as_deref());
    let base = base_url_for(&addr, args.profile.as_deref(), session.as_deref())?;
    let mut vars = variables(&base, &super::process_env());
    // Without a daemon, a configuration that requires keys gets one in its keys file (a daemon
    // started later reads it).
    let local = match (&daemon, &settings) {
        (None, Some(s)) if s.proxy.require_key => s
            .proxy
            .keys_file
            .as_deref()
            .map(|p| KeyStore::open(p, crate::clock::system()).map(std::sync::Arc::new))
            .transpose()?,
        _ => None,
    };
    let key = super::key::job_key(
        daemon.as_ref(),
        local,
        NewKey {
            name: Some("env".into()),
            // Bound to the profile it was made for: no other one accepts it.
            profile: args.profile.clone(),
            session: session.clone(),
            ttl: Some(args.ttl),
        },
    )
    .await?;
    if let Some((_, id, key)) = key {
        errln!(
            "behest-agent: OPENAI_API_KEY is local key {id}, valid for {}",
            humantime::format_duration(args.ttl)
        );
        for (k, v) in &mut vars {
            if *k == "OPENAI_API_KEY" {
                *v = key.clone();
            }
        }
    }
    out!("{}", render(args.format, &vars)?);
    Ok(ExitCode::SUCCESS)
}

/// The proxy's address: the daemon's first loopback TCP listener (see
/// [`Daemon::proxy_address`]), else the configuration's `proxy.listen` (nothing else of the
/// configuration is needed, so this works with none at all). A daemon that serves no proxy, or
/// one on Unix sockets only, is an error: the configuration's address would name nothing, or
/// another user's proxy.
pub fn proxy_address(g: &Global, daemon: Option<&Daemon>) -> anyhow::Result<String> {
    if let Some(d) = daemon {
        if let Some(addr) = d.proxy_address()? {
            return Ok(addr.to_string());
        }
        match d.proxy_listen().first() {
            Some(unix) => anyhow::bail!(
                "the running daemon's proxy listens only on {unix}, which no OpenAI SDK can take as a base URL; add a loopback TCP address to its proxy.listen (e.g. \"127.0.0.1:8711\")"
            ),
            None => anyhow::bail!(
                "the running daemon serves no proxy: its proxy.upstream is not set (set it, or BEHEST_BASE_URL, and restart it)"
            ),
        }
    }
    g.proxy_listen()?
        .iter()
        .find_map(|l| match l {
            ListenAddr::Tcp(a) => Some(a.to_string()),
            ListenAddr::Unix(_) => None,
        })
        .ok_or_else(|| anyhow::anyhow!("proxy.listen has no TCP address for OPENAI_BASE_URL"))
}

/// The settings as `profile` when the configuration loads (`None` when it does not: `env`
/// needs none); a profile the loaded configuration does not have is an error.
pub fn profile_settings(
    g: &Global,
    profile: Option<&str>,
) -> anyhow::Result<Option<crate::config::Settings>> {
    Ok(g.load_known_profile(profile)?.ok())
}

/// [`base_url`] with `/p/PROFILE/` first when a profile is given.
pub fn base_url_for(
    addr: &str,
    profile: Option<&str>,
    session: Option<&str>,
) -> anyhow::Result<String> {
    match profile {
        None => base_url(addr, session),
        Some(p) if crate::config::valid_profile(p) => {
            let rest = base_url("", session)?;
            Ok(format!(
                "http://{addr}/p/{p}{}",
                rest.trim_start_matches("http://")
            ))
        }
        Some(p) => anyhow::bail!(
            "--profile `{}`: a profile name is 1 to 32 of a-z, 0-9, '_' and '-'",
            p.escape_debug()
        ),
    }
}

/// `http://ADDR/v1`, or `http://ADDR/s/SESSION/v1`.
pub fn base_url(addr: &str, session: Option<&str>) -> anyhow::Result<String> {
    match session {
        None => Ok(format!("http://{addr}/v1")),
        Some(s) => {
            let s = parse_session(s).map_err(anyhow::Error::msg)?;
            Ok(format!("http://{addr}/s/{s}/v1"))
        }
    }
}

/// A session id for `env` and `exec`: 1 to 128 letters, digits, `-`, `_`, `.` or `~`, but not `.`
/// or `..` (a client would resolve them away), since it becomes part of a URL path. As
/// `--session`'s parser, a bad one is a usage error (exit 2).
pub fn parse_session(s: &str) -> Result<String, String> {
    if s.is_empty()
        || s.len() > 128
        || s == "."
        || s == ".."
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
    {
        return Err(format!(
            "--session `{}`: use 1 to 128 letters, digits, '-', '_', '.' or '~', not `.` or `..` alone (it becomes part of a URL path)",
            s.escape_debug()
        ));
    }
    Ok(s.to_string())
}

/// What a job needs to reach the proxy at `base`. When the job's environment (`process`) names an
/// HTTP proxy, `NO_PROXY` and `no_proxy` also get the proxy's host: curl and the SDKs would
/// otherwise send the job's requests to a company proxy, which cannot reach this loopback.
pub fn variables(base: &str, process: &HashMap<String, String>) -> Vec<(&'static str, String)> {
    let mut vars = vec![
        ("OPENAI_BASE_URL", base.to_string()),
        ("OPENAI_API_BASE", base.to_string()),
        ("OPENAI_API_KEY", PLACEHOLDER_KEY.to_string()),
    ];
    const PROXIES: [&str; 6] = [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ];
    let proxied = PROXIES
        .iter()
        .any(|k| process.get(*k).is_some_and(|v| !v.trim().is_empty()));
    let host = url::Url::parse(base).ok().and_then(|u| {
        u.host_str()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
    });
    if let (true, Some(host)) = (proxied, host) {
        // Both lists (tools differ in which they read), each entry once.
        let mut hosts: Vec<&str> = Vec::new();
        for h in ["no_proxy", "NO_PROXY"]
            .iter()
            .filter_map(|k| process.get(*k))
            .flat_map(|v| v.split(','))
            .map(str::trim)
        {
            if !h.is_empty() && !hosts.contains(&h) {
                hosts.push(h);
            }
        }
        if !hosts.iter().any(|h| *h == "*" || *h == host) {
            hosts.push(&host);
            // Without spaces, so every format (dotenv too) can carry it.
            let merged = hosts.join(",");
            vars.push(("NO_PROXY", merged.clone()));
            vars.push(("no_proxy", merged));
        }
    }
    vars
}

/// The variables in `format`'s syntax, each value quoted so that the shell (or the file's reader)
/// takes it literally. A value with a control character (a newline would start another variable)
/// is refused, as is, in `dotenv`, one whose readers would unquote it differently.
pub fn render(format: Format, vars: &[(&str, String)]) -> anyhow::Result<String> {
    let mut out = String::new();
    for (k, v) in vars {
        if v.chars().any(char::is_control) {
            anyhow::bail!(
                "{k} would hold a control character (`{}`): refusing to print it",
                v.escape_debug()
            );
        }
        let line = match format {
            Format::Sh => format!("export {k}='{}'\n", v.replace('\'', r"'\''")),
            Format::Fish => format!(
                "set -gx {k} '{}';\n",
                v.replace('\\', r"\\").replace('\'', r"\'")
            ),
            Format::Dotenv => {
                if !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.~:/@%+=,[]".contains(&b))
                {
                    anyhow::bail!(
                        "{k} = `{v}` cannot be written in dotenv format safely (its readers unquote differently); use --format sh"
                    );
                }
                format!("{k}={v}\n")
            }
            // $GITHUB_ENV takes the rest of the line literally.
            Format::Github => format!("{k}={v}\n"),
        };
        out.push_str(&line);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_format_renders_the_three_variables() {
        let vars = variables("http://127.0.0.1:8711/v1", &HashMap::new());
        assert_eq!(
            render(Format::Sh, &vars).unwrap(),
            "export OPENAI_BASE_URL='http://127.0.0.1:8711/v1'\nexport OPENAI_API_BASE='http://127.0.0.1:8711/v1'\nexport OPENAI_API_KEY='placeholder'\n"
        );
        assert_eq!(
            render(Format::Fish, &vars).unwrap().lines().next().unwrap(),
            "set -gx OPENAI_BASE_URL 'http://127.0.0.1:8711/v1';"
        );
        assert_eq!(
            render(Format::Dotenv, &vars)
                .unwrap()
                .lines()
                .last()
                .unwrap(),
            "OPENAI_API_KEY=placeholder"
        );
        assert_eq!(
            render(Format::Github, &vars).unwrap(),
            render(Format::Dotenv, &vars).unwrap()
        );
        let v6 = variables("http://[::1]:8711/v1", &HashMap::new());
        assert!(render(Format::Dotenv, &v6).is_ok());
    }

    #[test]
    fn with_a_proxy_in_the_environment_no_proxy_gets_the_proxys_host() {
        let env = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let no_proxy = |base: &str, pairs: &[(&str, &str)]| {
            variables(base, &env(pairs))
                .into_iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case("no_proxy"))
                .map(|(_, v)| v)
                .collect::<Vec<_>>()
        };
        let base = "http://127.0.0.1:8711/v1";
        assert!(no_proxy(base, &[]).is_empty(), "no proxy: nothing added");
        assert_eq!(
            no_proxy(base, &[("http_proxy", "http://p:3128")]),
            ["127.0.0.1", "127.0.0.1"]
        );
        assert_eq!(
            no_proxy(
                base,
                &[
                    ("HTTPS_PROXY", "http://p:3128"),
                    ("NO_PROXY", ".corp, localhost")
                ]
            ),
            [".corp,localhost,127.0.0.1", ".corp,localhost,127.0.0.1"]
        );
        assert!(
            no_proxy(
                base,
                &[("http_proxy", "http://p"), ("no_proxy", "x, 127.0.0.1")]
            )
            .is_empty(),
            "already listed"
        );
        assert_eq!(
            no_proxy(
                base,
                &[
                    ("http_proxy", "http://p"),
                    ("no_proxy", "a.com"),
                    ("NO_PROXY", "c.com,a.com")
                ]
            ),
            ["a.com,c.com,127.0.0.1", "a.com,c.com,127.0.0.1"],
            "both lists kept"
        );
        assert_eq!(
            no_proxy("http://[::1]:8711/v1", &[("ALL_PROXY", "http://p")]),
            ["::1", "::1"]
        );
    }

    #[test]
    fn quotes_in_a_value_are_escaped_for_sh_and_fish_and_refused_in_dotenv() {
        let evil = vec![("V", r"a'$(id)\b".to_string())];
        assert_eq!(
            render(Format::Sh, &evil).unwrap(),
            "export V='a'\\''$(id)\\b'\n"
        );
        assert_eq!(
            render(Format::Fish, &evil).unwrap(),
            "set -gx V 'a\\'$(id)\\\\b';\n"
        );
        assert!(render(Format::Dotenv, &evil).is_err());
    }

    #[test]
    fn a_control_character_in_a_value_is_refused_in_every_format() {
        for format in [Format::Sh, Format::Fish, Format::Dotenv, Format::Github] {
            for bad in ["http://127.0.0.1:1/v1\nEVIL=1", "a\rb", "a\u{1b}]0;x\u{7}"] {
                let vars = vec![("OPENAI_BASE_URL", bad.to_string())];
                assert!(render(format, &vars).is_err(), "{format:?} {bad:?}");
            }
        }
    }

    /// What `sh` makes of the line: the value comes back byte for byte, and nothing runs.
    #[test]
    fn sh_evaluates_a_rendered_value_to_itself_and_runs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let value = format!(
            "'; touch {m}; echo '$(touch {m})`touch {m}`\\",
            m = marker.display()
        );
        let line = render(Format::Sh, &[("V", value.clone())]).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{line}printf %s \"$V\""))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), value);
        assert!(!marker.exists(), "the value ran a command");
    }

    #[test]
    fn a_session_goes_into_the_path_and_unsafe_ones_are_refused() {
        assert_eq!(
            base_url("127.0.0.1:8711", Some("run-42")).unwrap(),
            "http://127.0.0.1:8711/s/run-42/v1"
        );
        assert_eq!(
            base_url_for("127.0.0.1:8711", Some("team-b"), Some("run-42")).unwrap(),
            "http://127.0.0.1:8711/p/team-b/s/run-42/v1"
        );
        assert_eq!(
            base_url_for("127.0.0.1:8711", Some("team-b"), None).unwrap(),
            "http://127.0.0.1:8711/p/team-b/v1"
        );
        assert!(base_url_for("127.0.0.1:8711", Some("../x"), None).is_err());
        assert_eq!(
            base_url("127.0.0.1:8711", Some("run-42")).unwrap(),
            "http://127.0.0.1:8711/s/run-42/v1"
        );
        assert!(base_url("127.0.0.1:8711", Some("a/b")).is_err());
        assert!(base_url("127.0.0.1:8711", Some("x'; rm -rf /")).is_err());
    }
}
