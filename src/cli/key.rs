//! `behest-agent key create|list|revoke`: local keys (SPEC §9). Through the running daemon's
//! control socket when one runs (it owns the keys file and applies the change at once), else on
//! `proxy.keys_file` directly. A new key is printed once, on stdout; `list` never shows a key.
//! Also the helpers `exec` and `env` use to make job keys.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use http::Method;
use serde_json::Value;

use super::{CliResult, Global, init_cli_logging, profile_daemon};
use crate::control::Daemon;
use crate::control::client::ANSWER_TIMEOUT;
use crate::keys::{KeyStore, NewKey};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: KeyCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum KeyCommand {
    /// Make a key and print it (once: only its hash is kept)
    Create(CreateArgs),
    /// Show the keys: id, name, profile, session, expiry, last use (never a key)
    List {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key: it is refused from the next request on
    Revoke {
        /// The key's id (from `key list`)
        id: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// A name to recognise the key by in `key list`
    #[arg(long, value_name = "N", value_parser = parse_name)]
    pub name: Option<String>,
    /// Bind the key to this profile
    #[arg(long, value_name = "P")]
    pub profile: Option<String>,
    /// Bind the key to this session: its requests are sent with this X-Session-Id, whatever
    /// they say
    #[arg(long, value_name = "S", value_parser = parse_session)]
    pub session: Option<String>,
    /// Make the key expire after this long (e.g. 12h, 30m)
    #[arg(long, value_name = "DUR", value_parser = super::parse_lifetime)]
    pub ttl: Option<Duration>,
}

fn parse_name(s: &str) -> Result<String, String> {
    if crate::keys::valid_name(s) {
        Ok(s.to_string())
    } else {
        Err(crate::keys::NAME_RULE.to_string())
    }
}

/// A key's session goes in `X-Session-Id`: the header's rule.
fn parse_session(s: &str) -> Result<String, String> {
    if crate::proxy::valid_session(s.as_bytes()) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "use 1 to {} visible ASCII characters (no spaces)",
            crate::proxy::MAX_SESSION_ID
        ))
    }
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    init_cli_logging(g);
    // A key bound to a profile the agent does not have would be refused on every request, and
    // one the daemon serves as another identity than this configuration would spend that one.
    let profile = match &args.command {
        KeyCommand::Create(a) => a.profile.as_deref(),
        _ => None,
    };
    let settings = g.load_known_profile(profile)?;
    let daemon = profile_daemon(g, settings.as_ref().ok(), profile).await?;
    // Without a daemon: the file itself (a file that does not parse is refused, never rewritten).
    let store = match &daemon {
        Some(_) => None,
        None => {
            // Only the file's path is needed (not the IdP settings), unless the key names a
            // profile: that must be one the configuration has.
            if profile.is_some() {
                g.load_profile(profile)?;
            }
            let path = g
                .keys_file()?
                .context("no keys file: set proxy.keys_file (or a state directory)")?;
            Some(KeyStore::open(&path, crate::clock::system())?)
        }
    };
    match args.command {
        KeyCommand::Create(a) => {
            let new = NewKey {
                name: a.name,
                profile: a.profile,
                session: a.session,
                ttl: a.ttl,
            };
            let created = match (&daemon, &store) {
                (Some(d), _) => create(d, &new).await?,
                (None, Some(s)) => {
                    let (key, entry) = s.create(new)?;
                    let mut v = entry.view(0);
                    v["key"] = Value::String(key);
                    v
                }
                (None, None) => unreachable!("a store without a daemon"),
            };
            errln!(
                "key {} created; it is shown this once (only its hash is kept):",
                created["id"].as_str().unwrap_or("?")
            );
            outln!("{}", created["key"].as_str().unwrap_or_default());
            let required = match &daemon {
                Some(d) => d
                    .status()
                    .pointer("/daemon/require_key")
                    .and_then(Value::as_bool),
                None => g.require_key().ok(),
            };
            if required == Some(false) {
                errln!(
                    "note: proxy.require_key is off, so the proxy asks no client for a key; keys count once it is on"
                );
            }
        }
        KeyCommand::List { json } => {
            let list = match (&daemon, &store) {
                (Some(d), _) => d
                    .request(Method::GET, "/v1/keys", ANSWER_TIMEOUT)
                    .await?
                    .get("keys")
                    .cloned()
                    .unwrap_or(Value::Array(vec![])),
                (None, Some(s)) => Value::Array(s.list()?),
                (None, None) => unreachable!("a store without a daemon"),
            };
            if json {
                outln!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                out!("{}", table(&list));
            }
        }
        KeyCommand::Revoke { id } => {
            match (&daemon, &store) {
                (Some(d), _) => revoke(d, &id).await?,
                (None, Some(s)) => s.revoke(&id)?,
                (None, None) => unreachable!("a store without a daemon"),
            }
            errln!("key {id} revoked");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `key list` as text: one line per key.
fn table(list: &Value) -> String {
    let empty = vec![];
    let list = list.as_array().unwrap_or(&empty);
    if list.is_empty() {
        return "no keys\n".to_string();
    }
    let field = |k: &Value, name: &str| k[name].as_str().unwrap_or("-").to_string();
    let mut rows =
        vec![["ID", "NAME", "PROFILE", "SESSION", "EXPIRES", "LAST USED"].map(String::from)];
    for k in list {
        let expires = match (k["expired"].as_bool(), k["expires_at"].as_str()) {
            (Some(true), Some(t)) => format!("{t} (expired)"),
            (_, Some(t)) => t.to_string(),
            _ => "never".to_string(),
        };
        rows.push([
            field(k, "id"),
            field(k, "name"),
            field(k, "profile"),
            field(k, "session"),
            expires,
            field(k, "last_used"),
        ]);
    }
    // Aligned columns (a name may hold spaces; scripts read `--json`).
    let mut widths = [0; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Where a job's key was made, to revoke it there.
pub enum JobKey {
    Daemon(Daemon),
    Local(std::sync::Arc<KeyStore>),
}

/// A key for one job (`exec`, `env`), when the proxy it uses requires keys: made through `daemon`
/// when it requires them, else in `local` (an in-process agent's store, or the keys file when no
/// daemon runs and the configuration requires keys). Returns where it lives, its id and the key.
pub async fn job_key(
    daemon: Option<&Daemon>,
    local: Option<std::sync::Arc<KeyStore>>,
    new: NewKey,
) -> anyhow::Result<Option<(JobKey, String, String)>> {
    if let Some(d) = daemon {
        if !requires_key(d) {
            return Ok(None);
        }
        let v = create(d, &new).await?;
        let id = v["id"].as_str().unwrap_or_default().to_string();
        let key = v["key"].as_str().unwrap_or_default().to_string();
        return Ok(Some((JobKey::Daemon(d.clone()), id, key)));
    }
    match local {
        Some(store) => {
            let (key, entry) = store.create(new)?;
            Ok(Some((JobKey::Local(store), entry.id.clone(), key)))
        }
        None => Ok(None),
    }
}

impl JobKey {
    /// Revokes the job's key `id`.
    pub async fn revoke(&self, id: &str) -> anyhow::Result<()> {
        match self {
            JobKey::Daemon(d) => revoke(d, id).await,
            JobKey::Local(s) => Ok(s.revoke(id)?),
        }
    }
}

/// Whether the daemon refuses requests without a local key (its `/v1/status`).
pub fn requires_key(d: &Daemon) -> bool {
    d.status().pointer("/daemon/require_key") == Some(&Value::Bool(true))
}

/// Makes a key through the daemon; its answer holds `id` and `key`.
pub async fn create(d: &Daemon, new: &NewKey) -> anyhow::Result<Value> {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    if let Some(v) = &new.name {
        q.append_pair("name", v);
    }
    if let Some(v) = &new.profile {
        q.append_pair("profile", v);
    }
    if let Some(v) = &new.session {
        q.append_pair("session", v);
    }
    if let Some(t) = new.ttl {
        q.append_pair("ttl", &t.as_secs().max(1).to_string());
    }
    let v = d
        .request(
            Method::POST,
            &format!("/v1/keys?{}", q.finish()),
            ANSWER_TIMEOUT,
        )
        .await?;
    if !v["key"]
        .as_str()
        .is_some_and(|k| k.starts_with(crate::keys::PREFIX))
    {
        anyhow::bail!("the daemon's answer to POST /v1/keys holds no key");
    }
    Ok(v)
}

/// Revokes a key through the daemon.
pub async fn revoke(d: &Daemon, id: &str) -> anyhow::Result<()> {
    let id: String = url::form_urlencoded::byte_serialize(id.as_bytes()).collect();
    d.request(Method::DELETE, &format!("/v1/keys/{id}"), ANSWER_TIMEOUT)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_table_lines_up_whatever_the_names() {
        let list = serde_json::json!([
            {"id": "bak_1", "name": "exec 10605", "profile": "team-b", "session": "gl-1", "expires_at": "2026-12-07T18:00:00Z"},
            {"id": "bak_22", "name": "a", "last_used": "2026-12-07T17:00:00Z"},
        ]);
        let t = table(&list);
        let lines: Vec<&str> = t.lines().collect();
        let at = |name: &str| lines[0].find(name).unwrap();
        assert_eq!(&lines[1][at("PROFILE")..][..6], "team-b", "{t}");
        assert_eq!(&lines[2][at("PROFILE")..][..1], "-", "{t}");
        assert_eq!(&lines[2][at("EXPIRES")..][..5], "never", "{t}");
        assert!(
            lines[2][at("LAST USED")..].starts_with("2026-12-07T17"),
            "{t}"
        );
    }
}
