//! `behest-agent status`: the token's state, last refresh and error, and the daemon's figures. Never
//! prints the token. Without a daemon it reports the disk cache. Exit 1 when no valid token is held.

use std::process::ExitCode;

use anyhow::anyhow;
use serde_json::{Value, json};

use super::{CliResult, Global, init_cli_logging, profile_daemon};
use crate::control::server::expires_words;
use crate::token::TokenSource;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON
    #[arg(long)]
    pub json: bool,
    /// The profile to show as `token` ([profiles.NAME]; default: [auth])
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    init_cli_logging(g);
    let settings = g.load_known_profile(args.profile.as_deref())?;
    let mut doc = match profile_daemon(g, settings.as_ref().ok(), args.profile.as_deref()).await? {
        Some(d) => d.status().clone(),
        None => {
            let settings = settings?;
            let all = g.load()?;
            // Every profile's disk cache, as the daemon would report them.
            let mut profiles = serde_json::Map::new();
            for name in std::iter::once(crate::config::DEFAULT_PROFILE)
                .chain(all.profiles.keys().map(String::as_str))
            {
                let Some(s) = all.profile(name) else { continue };
                let source =
                    TokenSource::new(&s, crate::clock::system()).map_err(|e| anyhow!(e))?;
                source.load_cache().await;
                source.check_cache().await;
                source.check_fleet().await;
                profiles.insert(name.to_string(), json!({ "token": source.status() }));
            }
            let default = profiles
                .get(crate::config::DEFAULT_PROFILE)
                .map(|p| p["token"].clone())
                .unwrap_or(Value::Null);
            json!({
                "token": default,
                "profiles": profiles,
                "daemon": Value::Null,
                "cache_file": settings.token.cache_file.as_ref().map(|p| p.display().to_string()),
            })
        }
    };
    // `--profile NAME`: that profile's token is the one shown (and decides the exit status).
    if let Some(name) = &args.profile {
        let token = doc
            .pointer(&format!("/profiles/{name}/token"))
            .cloned()
            .ok_or_else(|| anyhow!("the daemon has no profile `{}`", name.escape_debug()))?;
        doc["token"] = token;
        doc["profile"] = json!(name);
    }
    let ready = doc
        .pointer("/token/ready")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if args.json {
        outln!("{doc}");
    } else {
        out!("{}", human(&doc));
    }
    Ok(if ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn human(doc: &Value) -> String {
    let s = |p: &str| {
        doc.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("-")
            .to_string()
    };
    let mut out = String::new();
    let t = "/token";
    let state = s(&format!("{t}/state"));
    match doc
        .pointer(&format!("{t}/expires_in"))
        .and_then(Value::as_i64)
    {
        Some(secs) => out.push_str(&format!(
            "token:        {state}, expires {} ({})\n",
            expires_words(secs),
            s(&format!("{t}/expires_at"))
        )),
        None => out.push_str(&format!("token:        {state}\n")),
    }
    for claim in ["uid", "tid", "pid", "tier"] {
        out.push_str(&format!(
            "  {claim}:{:width$}{}\n",
            "",
            s(&format!("{t}/claims/{claim}")),
            width = 11 - claim.len()
        ));
    }
    out.push_str(&format!("client_id:    {}\n", s(&format!("{t}/client_id"))));
    out.push_str(&format!("issuer:       {}\n", s(&format!("{t}/issuer"))));
    out.push_str(&format!(
        "last refresh: {}\n",
        s(&format!("{t}/last_refresh"))
    ));
    out.push_str(&format!(
        "next refresh: {}\n",
        s(&format!("{t}/next_refresh"))
    ));
    out.push_str(&format!(
        "last error:   {}\n",
        doc.pointer(&format!("{t}/last_error"))
            .and_then(Value::as_str)
            .unwrap_or("none")
    ));
    if let Some(w) = doc
        .pointer(&format!("{t}/warnings"))
        .and_then(Value::as_array)
    {
        for w in w.iter().filter_map(Value::as_str) {
            out.push_str(&format!("warning:      {w}\n"));
        }
    }
    if let Some(e) = doc
        .pointer(&format!("{t}/cache_error"))
        .and_then(Value::as_str)
    {
        out.push_str(&format!(
            "cache:        {e} (every restart and one-shot call makes a grant)\n"
        ));
    }
    if let Some(f) = doc.pointer(&format!("{t}/fleet")) {
        out.push_str(&format!("fleet:        {}\n", fleet_words(f)));
    }
    match doc.get("daemon") {
        Some(Value::Null) | None => {
            out.push_str("daemon:       not running (state read from the disk cache)\n")
        }
        Some(d) => {
            out.push_str(&format!(
                "daemon:       pid {}, version {}, up since {}\n",
                d.get("pid").map(|v| v.to_string()).unwrap_or_default(),
                d.get("version").and_then(Value::as_str).unwrap_or("?"),
                d.get("started_at").and_then(Value::as_str).unwrap_or("?"),
            ));
            if let Some(u) = d.get("upstream").and_then(Value::as_str) {
                out.push_str(&format!("upstream:     {u}\n"));
            }
            if let Some(e) = d.get("egress").and_then(Value::as_str) {
                out.push_str(&format!("egress:       {e}\n"));
            }
            if let Some(l) = d.get("listen").and_then(Value::as_array) {
                let l: Vec<&str> = l.iter().filter_map(Value::as_str).collect();
                out.push_str(&format!("proxy listen: {}\n", l.join(", ")));
            }
            if let Some(r) = d.get("reload_refused").filter(|r| !r.is_null()) {
                out.push_str(&format!(
                    "reload:       refused at {} (the previous configuration runs): {}\n",
                    r.get("at").and_then(Value::as_str).unwrap_or("?"),
                    r.get("error").and_then(Value::as_str).unwrap_or("?"),
                ));
            }
        }
    }
    if let Some(p) = doc.get("proxy").filter(|p| !p.is_null()) {
        out.push_str(&format!("proxy:        {}\n", proxy_words(p)));
    }
    out
}

/// `off`, `connected (redis://…)`, `unreachable (error)`, and what the fleet gave this agent.
fn fleet_words(f: &Value) -> String {
    let state = f.get("state").and_then(Value::as_str).unwrap_or("off");
    let mut out = match (state, f.get("error").and_then(Value::as_str)) {
        ("off", _) => return "off".to_string(),
        ("unreachable", Some(e)) => format!("unreachable ({e})"),
        (state, _) => match f.get("redis").and_then(Value::as_str) {
            Some(r) => format!("{state} ({r})"),
            None => state.to_string(),
        },
    };
    if state == "connected"
        && let Some(e) = f.get("error").and_then(Value::as_str)
    {
        out.push_str(&format!("; {e}"));
    }
    let n = |p: &str| f.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    out.push_str(&format!(
        "; shared tokens used {}, own grants shared {}, misses {}, errors {}",
        n("/reads/hit"),
        n("/grants"),
        n("/reads/miss"),
        n("/reads/error")
    ));
    out
}

/// The daemon's proxy counters in a line, e.g. `12 requests (2xx 10, 4xx 2), 1 in flight, 3
/// connections, 0 replays, 0 upstream errors`; classes with no response are left out.
fn proxy_words(p: &Value) -> String {
    let n = |k: &str| p.get(k).and_then(Value::as_u64).unwrap_or(0);
    let classes: Vec<String> = ["1xx", "2xx", "3xx", "4xx", "5xx"]
        .into_iter()
        .filter_map(|c| {
            let v = p
                .pointer(&format!("/responses/{c}"))
                .and_then(Value::as_u64)?;
            (v > 0).then(|| format!("{c} {v}"))
        })
        .collect();
    let by_class = if classes.is_empty() {
        String::new()
    } else {
        format!(" ({})", classes.join(", "))
    };
    let count = |k: &str, what: &str| {
        let v = n(k);
        format!("{v} {what}{}", if v == 1 { "" } else { "s" })
    };
    format!(
        "{}{by_class}, {} in flight, {}, {}, {}",
        count("requests_total", "request"),
        n("in_flight"),
        count("connections", "connection"),
        count("replays", "replay"),
        count("upstream_errors", "upstream error"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fleet_line_says_off_connected_or_unreachable_with_the_error() {
        let line = |fleet: Value| human(&json!({"token": {"state": "valid", "fleet": fleet}}));
        assert!(line(json!({"state": "off"})).contains("fleet:        off\n"));
        let connected = line(json!({
            "state": "connected", "error": null, "redis": "redis://10.0.0.5:6379/0",
            "reads": {"hit": 3, "miss": 1, "error": 0}, "grants": 1,
        }));
        assert!(
            connected.contains(
                "fleet:        connected (redis://10.0.0.5:6379/0); shared tokens used 3, own grants shared 1, misses 1, errors 0\n"
            ),
            "{connected}"
        );
        let down = line(json!({
            "state": "unreachable", "error": "Connection refused (os error 111)",
            "redis": "redis://10.0.0.5:6379/0", "reads": {"hit": 0, "miss": 0, "error": 2}, "grants": 0,
        }));
        assert!(
            down.contains("fleet:        unreachable (Connection refused (os error 111)); "),
            "{down}"
        );
    }

    #[test]
    fn proxy_counters_read_as_words() {
        let doc = json!({
            "token": {"state": "valid"},
            "proxy": {
                "upstream": "https://api.behest.example/",
                "requests_total": 12,
                "responses": {"1xx": 0, "2xx": 10, "3xx": 0, "4xx": 2, "5xx": 0},
                "in_flight": 1,
                "connections": 3,
                "replays": 0,
                "upstream_errors": 4,
            },
        });
        let text = human(&doc);
        assert!(
            text.contains(
                "proxy:        12 requests (2xx 10, 4xx 2), 1 in flight, 3 connections, \
                 0 replays, 4 upstream errors\n"
            ),
            "{text}"
        );
        let idle = json!({"proxy": {"requests_total": 0, "responses": {}}});
        assert!(
            human(&idle).contains("proxy:        0 requests, 0 in flight,"),
            "{}",
            human(&idle)
        );
        let one = json!({"proxy": {"requests_total": 1, "responses": {"2xx": 1}, "connections": 1, "replays": 1, "upstream_errors": 1}});
        assert!(
            human(&one).contains(
                "proxy:        1 request (2xx 1), 0 in flight, 1 connection, 1 replay, 1 upstream error\n"
            ),
            "{}",
            human(&one)
        );
    }
}
