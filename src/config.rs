//! Configuration: the TOML file, then `BEHEST_AGENT__SECTION__KEY` environment variables, then
//! command-line overrides, merged with the `config` crate into [`file::FileConfig`] and validated into
//! [`Settings`]. The environment is passed in as a map so tests never touch the process environment.

pub mod file;
pub mod settings;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use settings::*;

/// The default config file location.
pub const DEFAULT_PATH: &str = "/etc/behest-agent/config.toml";

/// A configuration problem: always names the key (or the file) and says what to do. The remedy is
/// [`ConfigError::fix`]; where the message does not already carry one, it is the message's end.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}; {}", self.problem(), self.fix())]
    Read { file: String, error: std::io::Error },
    /// Not TOML, a value of the wrong type, a key that cannot be one, …
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    /// A key the configuration does not have (a typo must not fall back to a default).
    #[error("{} ({})", self.problem(), self.fix())]
    UnknownKey { file: String, message: String },
    #[error("{}: {}", self.problem(), self.fix())]
    Missing {
        file: String,
        key: String,
        hint: String,
    },
    #[error("{file}: `{key}`: {message}")]
    Invalid {
        file: String,
        key: String,
        message: String,
    },
}

fn file_label(path: Option<&Path>) -> String {
    match path {
        Some(p) => p.display().to_string(),
        None => "configuration (no file; environment only)".to_string(),
    }
}

impl ConfigError {
    /// What is wrong, naming the file and the key, without the remedy.
    pub fn problem(&self) -> String {
        match self {
            ConfigError::Read { file, error } => {
                format!("{file}: cannot read the config file: {error}")
            }
            ConfigError::Parse { file, message } | ConfigError::UnknownKey { file, message } => {
                format!("{file}: {message}")
            }
            ConfigError::Missing { file, key, .. } => format!("{file}: `{key}` is missing"),
            ConfigError::Invalid { .. } => self.to_string(),
        }
    }

    /// What to do about it: the one place each remedy is written.
    pub fn fix(&self) -> String {
        match self {
            ConfigError::Read { .. } => "check the path given with --config or BEHEST_AGENT_CONFIG, and that this user may read it".into(),
            ConfigError::Parse { file, .. } if file.starts_with(SET_BY) => {
                format!("correct the {}", &file[SET_BY.len()..])
            }
            ConfigError::Parse { .. } => "correct the TOML (or the --set / BEHEST_AGENT__… value) named above".into(),
            ConfigError::UnknownKey { .. } => "remove or correct the key; config/behest-agent.toml lists every key".into(),
            ConfigError::Missing { hint, .. } => hint.clone(),
            ConfigError::Invalid { file, .. } if file.starts_with(SET_BY) => {
                format!("correct the {}", &file[SET_BY.len()..])
            }
            ConfigError::Invalid { key, .. }
                if key.split('.').all(plain_key) && !key.contains('-') =>
            {
                format!(
                    "correct `{key}` in the file, or its environment variable BEHEST_AGENT__{}",
                    key.replace('.', "__").to_uppercase()
                )
            }
            // Not a config key: the systemd credential `client-secret`.
            ConfigError::Invalid { key, .. } => format!("correct the {key}"),
        }
    }

    pub fn missing(path: Option<&Path>, key: &str, hint: &str) -> Self {
        ConfigError::Missing {
            file: file_label(path),
            key: key.to_string(),
            hint: hint.to_string(),
        }
    }

    /// Names the environment variable or `--set` that gave the value, when one did (the file
    /// did not).
    fn attributed(self, opts: &LoadOptions) -> Self {
        match self {
            // Missing although a variable or `--set` names it: it was given empty (an unset CI
            // variable), which also hid the file's value.
            ConfigError::Missing { file, key, hint } => match setter(opts, &key) {
                Some(by) => ConfigError::Invalid {
                    file: by,
                    message: "is empty, so it is not set at all (a value in the file is not used either); give it a value, or unset it".to_string(),
                    key,
                },
                None => ConfigError::Missing { file, key, hint },
            },
            ConfigError::Invalid { file, key, message } => ConfigError::Invalid {
                file: setter(opts, &key).unwrap_or(file),
                key,
                message,
            },
            // The `config` crate ends a value's error with "for key `section.key`".
            ConfigError::Parse { file, message } => {
                let key = message
                    .rsplit_once("for key `")
                    .and_then(|(_, rest)| rest.split_once('`'))
                    .map(|(key, _)| key.to_string());
                ConfigError::Parse {
                    file: key.and_then(|k| setter(opts, &k)).unwrap_or(file),
                    message,
                }
            }
            other => other,
        }
    }

    pub fn invalid(path: Option<&Path>, key: &str, message: String) -> Self {
        ConfigError::Invalid {
            file: file_label(path),
            key: key.to_string(),
            message,
        }
    }
}

/// How an error names a value that did not come from the file.
const SET_BY: &str = "value set by ";

/// The `--set` or `BEHEST_AGENT__…` variable that gave `key` its value, if one did (`--set` wins,
/// as in the merge).
fn setter(opts: &LoadOptions, key: &str) -> Option<String> {
    if opts.overrides.iter().any(|(k, _)| k == key) {
        return Some(format!("{SET_BY}--set {key}"));
    }
    // The `config` crate reads variable names in any case.
    let var = format!("BEHEST_AGENT__{}", key.replace('.', "__"));
    opts.env
        .keys()
        .find(|k| k.eq_ignore_ascii_case(&var))
        .map(|k| format!("{SET_BY}environment variable {k}"))
}

/// What to load and from where.
#[derive(Debug, Default, Clone)]
pub struct LoadOptions {
    /// `--config` / `BEHEST_AGENT_CONFIG`: must exist.
    pub path: Option<PathBuf>,
    /// Read when `path` is `None` and the file exists: [`DEFAULT_PATH`] for the CLI; `None` in tests
    /// and `dev`, which must not pick up the machine's configuration.
    pub default_path: Option<PathBuf>,
    /// The process environment (or a test's map).
    pub env: HashMap<String, String>,
    /// `--set section.key=value` overrides, applied last.
    pub overrides: Vec<(String, String)>,
}

/// Checks a log level or filter: `info`, or directives such as `warn,behest_agent=debug`. A bare
/// word must be a level (tracing would read `warnn` as a target, and log nothing else); a
/// directive `target=level` must end in one.
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |s: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(s.trim()));
    let bad = || {
        format!(
            "`{filter}` is not a level or filter: use one of trace, debug, info, warn, error, off, or directives like \"warn,behest_agent=debug\""
        )
    };
    for directive in filter.split(',').map(str::trim) {
        let level = match directive.rsplit_once('=') {
            // A span or field filter (`target[span{field=value}]=level`) is left to tracing.
            _ if directive.contains('[') => continue,
            Some((target, level)) if !target.trim().is_empty() => level,
            Some(_) => return Err(bad()),
            None => directive,
        };
        if !is_level(level) {
            return Err(bad());
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(drop)
        .map_err(|_| bad())
}

/// The control socket the configuration names, even when the rest of it does not validate (so the
/// CLI can still reach a running daemon); the default location when nothing names one. A file
/// that cannot be read or parsed is an error: the socket it may name is unknown, and guessing the
/// default could reach (and `stop`) another daemon.
pub fn control_socket(opts: &LoadOptions) -> Result<std::path::PathBuf, ConfigError> {
    let (_, model) = merged(opts).map_err(|e| e.attributed(opts))?;
    Ok(model
        .control
        .socket
        .filter(|s| !s.trim().is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| settings::default_socket(&opts.env)))
}

/// The proxy's listen addresses (default `127.0.0.1:8711`), validated without the rest of the
/// configuration: a client that only points a job at the proxy (`env`) needs no IdP settings. The
/// file, the environment and the overrides are merged as for [`load`], so a broken file is still
/// an error.
pub fn proxy_listen(opts: &LoadOptions) -> Result<Vec<ListenAddr>, ConfigError> {
    let (path, model) = merged(opts).map_err(|e| e.attributed(opts))?;
    let origin = settings::Origin {
        env: &opts.env,
        path: path.as_deref(),
    };
    settings::listen(
        model.proxy.listen,
        model.proxy.allow_remote.unwrap_or(false),
        origin,
    )
    .map_err(|e| e.attributed(opts))
}

/// `proxy.session_id` (when set) and `proxy.session_from_ci` (default true), read like
/// [`proxy_listen`] without the rest of the configuration, for `env` and `exec`.
pub fn session_keys(opts: &LoadOptions) -> Result<(Option<String>, bool), ConfigError> {
    let (_, model) = merged(opts).map_err(|e| e.attributed(opts))?;
    let session_id = model
        .proxy
        .session_id
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    Ok((session_id, model.proxy.session_from_ci.unwrap_or(true)))
}

/// `usage.ledger_file` (the state directory's usage.jsonl unless set; `""`: none), read like
/// [`proxy_listen`] without the rest of the configuration: `usage` with no daemon reads the
/// ledger, which needs no IdP settings.
pub fn ledger_file(opts: &LoadOptions) -> Result<Option<PathBuf>, ConfigError> {
    let (path, model) = merged(opts).map_err(|e| e.attributed(opts))?;
    let origin = settings::Origin {
        env: &opts.env,
        path: path.as_deref(),
    };
    settings::usage(model.usage, origin)
        .map(|u| u.ledger_file)
        .map_err(|e| e.attributed(opts))
}

/// `proxy.keys_file` (the state directory's keys.json unless set), read like [`proxy_listen`]:
/// `key` with no daemon edits the file, which needs no IdP settings.
pub fn keys_file(opts: &LoadOptions) -> Result<Option<PathBuf>, ConfigError> {
    let (path, model) = merged(opts).map_err(|e| e.attributed(opts))?;
    let origin = settings::Origin {
        env: &opts.env,
        path: path.as_deref(),
    };
    settings::keys_file(model.proxy.keys_file, origin).map_err(|e| e.attributed(opts))
}

/// `proxy.require_key`, needing nothing else of the configuration (`key create`'s note).
pub fn require_key(opts: &LoadOptions) -> Result<bool, ConfigError> {
    let (_, model) = merged(opts).map_err(|e| e.attributed(opts))?;
    Ok(model.proxy.require_key.unwrap_or(false))
}

/// Loads and validates the configuration.
pub fn load(opts: &LoadOptions) -> Result<Settings, ConfigError> {
    load_adjusted(opts, |_| {})
}

/// [`load`], with `adjust` applied to the merged values before they are validated (`dev` puts its
/// embedded IdP and upstream in place of the file's).
pub fn load_adjusted(
    opts: &LoadOptions,
    adjust: impl FnOnce(&mut file::FileConfig),
) -> Result<Settings, ConfigError> {
    let (path, mut model) = merged(opts).map_err(|e| e.attributed(opts))?;
    adjust(&mut model);
    settings::validate(model, &opts.env, path.as_deref()).map_err(|e| e.attributed(opts))
}

/// The file, the environment and the overrides merged into the file model.
fn merged(opts: &LoadOptions) -> Result<(Option<PathBuf>, file::FileConfig), ConfigError> {
    let path: Option<PathBuf> = match &opts.path {
        Some(p) => {
            if let Err(error) = std::fs::metadata(p) {
                return Err(ConfigError::Read {
                    file: p.display().to_string(),
                    error,
                });
            }
            Some(p.clone())
        }
        None => opts.default_path.clone().filter(|p| p.exists()),
    };
    let label = file_label(path.as_deref());

    let mut builder = config::Config::builder();
    if let Some(p) = &path {
        let text = std::fs::read_to_string(p).map_err(|error| ConfigError::Read {
            file: label.clone(),
            error,
        })?;
        // The `config` crate reads a key like `a[N]` as element N and grows an array to it; only
        // plain section names are valid at the top level anyway.
        let table =
            config::Source::collect(&config::File::from_str(&text, config::FileFormat::Toml))
                .map_err(|e| ConfigError::Parse {
                    file: label.clone(),
                    message: e.to_string(),
                })?;
        if let Some(bad) = table.keys().find(|k| !plain_key(k)) {
            return Err(ConfigError::Parse {
                file: label.clone(),
                message: format!("`{bad}` is not a section name (remove or correct it)"),
            });
        }
        builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
    }
    // Only `BEHEST_AGENT__…` variables: `BEHEST_AGENT_CONFIG` and `BEHEST_AGENT_CLIENT_SECRET` have a
    // single underscore and are not config keys.
    let env: HashMap<String, String> = opts
        .env
        .iter()
        .filter(|(k, _)| k.starts_with("BEHEST_AGENT__"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let env_keys: Vec<String> = env.keys().cloned().collect();
    if let Some(bad) = env
        .keys()
        .find(|k| !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
    {
        return Err(ConfigError::Parse {
            file: label.clone(),
            message: format!(
                "environment variable `{bad}` is not a config key (BEHEST_AGENT__SECTION__KEY, letters, digits and _ only)"
            ),
        });
    }
    if let Some((bad, _)) = opts
        .overrides
        .iter()
        .find(|(k, _)| !k.split('.').all(plain_key))
    {
        return Err(ConfigError::Parse {
            file: label.clone(),
            message: format!("--set `{bad}` is not a key like section.key"),
        });
    }
    builder = builder.add_source(
        config::Environment::with_prefix("BEHEST_AGENT")
            .prefix_separator("__")
            .separator("__")
            .source(Some(env))
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("proxy.listen")
            .with_list_parse_key("proxy.allowed_origins")
            .with_list_parse_key("proxy.allowed_hosts")
            .with_list_parse_key("token.required_claims"),
    );
    for (k, v) in &opts.overrides {
        builder = builder
            .set_override(k.as_str(), v.as_str())
            .map_err(|e| ConfigError::Parse {
                file: label.clone(),
                message: format!("--set {k}: {e}"),
            })?;
    }
    let merged = builder.build().map_err(|e| ConfigError::Parse {
        file: label.clone(),
        message: e.to_string(),
    })?;
    let model: file::FileConfig = merged.try_deserialize().map_err(|e| {
        let message = e.to_string();
        // serde's words for a key the model does not have: "unknown field `NAME`, …". One that
        // came from `--set` or the environment is named by it, not by the file.
        if message.contains("unknown field") {
            let name = message.split('`').nth(1).unwrap_or_default();
            let set = opts
                .overrides
                .iter()
                .find(|(k, _)| k.split('.').any(|part| part.eq_ignore_ascii_case(name)));
            let variable = env_keys.iter().find(|k| {
                k.split("__")
                    .skip(1)
                    .any(|part| part.eq_ignore_ascii_case(name))
            });
            let file = match (set, variable) {
                (Some((k, _)), _) => format!("--set {k}"),
                (None, Some(v)) => format!("environment variable {v}"),
                (None, None) => label.clone(),
            };
            ConfigError::UnknownKey { file, message }
        } else {
            ConfigError::Parse {
                file: label.clone(),
                message,
            }
        }
    })?;
    Ok((path, model))
}

/// `[a-z0-9_-]+`: a section, key or profile name with nothing the `config` crate would read as a
/// path.
fn plain_key(k: &str) -> bool {
    !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}
