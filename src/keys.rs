//! Local keys (SPEC §9): what a client on a shared runner must present to use the proxy when
//! `proxy.require_key` is on. A key is `bak_` + 32 random bytes in base64url, shown once at
//! creation; only its SHA-256 is kept, in `proxy.keys_file` (JSON, mode 0600, replaced atomically:
//! temporary file, fsync, rename — a rename replaces a symlink at the path, never writes through it).
//!
//! The running daemon owns the file: `key create` and `key revoke` go through its control socket
//! and apply at once; without a daemon the CLI edits the file itself. Every edit holds the lock
//! `FILE.lock` and reads the file again first, so edits by several processes are never lost. The daemon also notices an
//! edit by anyone else: on the request path it looks at the file's inode, size and mtime at most
//! once a second and reads it again when they changed. A file that does not parse is an error that
//! keeps the keys already loaded in force; a missing file holds no keys.
//!
//! The hot path is one SHA-256 of the presented key and one hash-map lookup of the digest (so no
//! comparison of secrets whose timing could leak). `last_used` is an atomic in each entry; it is
//! written to the file lazily, whenever the daemon writes the file for another reason and when it
//! stops. Never logged, never in an error: a key, or its hash.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::HeaderMap;
use http::header::{AUTHORIZATION, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::clock::SharedClock;
use crate::proxy::ProxyError;
use crate::token::rfc3339;

/// What every key starts with (so a leaked one can be recognised by secret scanners).
pub const PREFIX: &str = "bak_";
/// Random bytes in a key.
const KEY_BYTES: usize = 32;
/// How often, at most, the request path looks at the file for an edit by someone else.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// A keys file larger than this is refused (thousands of keys fit).
const MAX_FILE: u64 = 4 << 20;
/// The longest name, profile or session a key may carry.
const MAX_LABEL: usize = 128;
/// What [`valid_name`] asks of a key's name.
pub const NAME_RULE: &str = "at most 128 characters, none of them control characters";

/// A key's name: shown in `key list`, so bounded and without control characters.
pub fn valid_name(name: &str) -> bool {
    name.len() <= MAX_LABEL && !name.chars().any(char::is_control)
}
/// How long an edit waits for another process's edit of the file (a read, a write, a rename).
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// `api-key` (Azure OpenAI SDKs send the key there).
pub const API_KEY: HeaderName = HeaderName::from_static("api-key");
/// `x-api-key` (Anthropic-style SDKs).
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Why the keys file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read the keys file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error(
        "the keys file {path} is not valid ({reason}): fix it or remove it; the keys loaded before stay in force"
    )]
    Corrupt { path: String, reason: String },
    #[error("cannot write the keys file {path}: {error}")]
    Write { path: String, error: std::io::Error },
    #[error("no key has the id `{0}` (see `behest-agent key list`)")]
    NoSuchKey(String),
    #[error("{0}")]
    Invalid(String),
}

/// What a new key is bound to.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: Option<String>,
    pub profile: Option<String>,
    pub session: Option<String>,
    pub ttl: Option<Duration>,
}

impl NewKey {
    /// Checks the labels: a session follows the `/s/ID/` rule, a profile is a plain name.
    pub fn check(&self) -> Result<(), KeysError> {
        if let Some(s) = &self.session
            && !crate::proxy::valid_session(s.as_bytes())
        {
            return Err(KeysError::Invalid(format!(
                "--session `{}`: use 1 to {} visible ASCII characters",
                s.escape_debug(),
                crate::proxy::MAX_SESSION_ID
            )));
        }
        if let Some(p) = &self.profile
            && (p.is_empty()
                || p.len() > MAX_LABEL
                || !p
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            return Err(KeysError::Invalid(format!(
                "--profile `{}`: use 1 to {MAX_LABEL} letters, digits, '-' or '_'",
                p.escape_debug()
            )));
        }
        if let Some(n) = &self.name
            && !valid_name(n)
        {
            return Err(KeysError::Invalid(format!("--name: {NAME_RULE}")));
        }
        if self.ttl.is_some_and(|t| t.is_zero()) {
            return Err(KeysError::Invalid(
                "--ttl 0 would make a key that never works; give a duration such as 12h".into(),
            ));
        }
        Ok(())
    }
}

/// One key as the file holds it (its SHA-256, never the key).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    session: Option<String>,
    /// Hex SHA-256 of the key.
    sha256: String,
    /// Unix seconds.
    created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_used: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    version: u32,
    keys: Vec<Stored>,
}

/// A key in force.
pub struct KeyEntry {
    pub id: String,
    pub name: Option<String>,
    pub profile: Option<String>,
    pub session: Option<String>,
    /// `session` as the header the proxy sets.
    pub session_header: Option<HeaderValue>,
    created_at: u64,
    expires_at: Option<u64>,
    /// Unix seconds; 0: never.
    last_used: AtomicU64,
    sha256: [u8; 32],
}

impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the hash: nothing derived from a key is printed.
        f.debug_struct("KeyEntry")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("profile", &self.profile)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl KeyEntry {
    fn from_stored(s: Stored) -> Result<KeyEntry, String> {
        let sha256 = parse_hex32(&s.sha256)
            .ok_or_else(|| format!("key `{}`: sha256 is not 64 hex digits", s.id.escape_debug()))?;
        let session_header = match &s.session {
            Some(v) => Some(
                HeaderValue::from_str(v)
                    .ok()
                    .filter(|_| crate::proxy::valid_session(v.as_bytes()))
                    .ok_or_else(|| {
                        format!("key `{}`: session is not valid", s.id.escape_debug())
                    })?,
            ),
            None => None,
        };
        Ok(KeyEntry {
            id: s.id,
            name: s.name,
            profile: s.profile,
            session: s.session,
            session_header,
            created_at: s.created_at,
            expires_at: s.expires_at,
            last_used: AtomicU64::new(s.last_used.unwrap_or(0)),
            sha256,
        })
    }

    fn to_stored(&self) -> Stored {
        let last = self.last_used.load(Ordering::Relaxed);
        Stored {
            id: self.id.clone(),
            name: self.name.clone(),
            profile: self.profile.clone(),
            session: self.session.clone(),
            sha256: hex(&self.sha256),
            created_at: self.created_at,
            expires_at: self.expires_at,
            last_used: (last != 0).then_some(last),
        }
    }

    fn expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|e| now >= e)
    }

    /// What `key list` shows: never the key nor its hash.
    pub fn view(&self, now: u64) -> Value {
        let time = |t: u64| crate::clock::from_unix(t).map(rfc3339);
        let last = self.last_used.load(Ordering::Relaxed);
        json!({
            "id": self.id,
            "name": self.name,
            "profile": self.profile,
            "session": self.session,
            "created_at": time(self.created_at),
            "expires_at": self.expires_at.and_then(time),
            "expired": self.expired(now),
            "last_used": (last != 0).then(|| time(last)).flatten(),
        })
    }
}

/// The keys in force, by the SHA-256 of the key.
type Table = HashMap<[u8; 32], Arc<KeyEntry>>;

/// The file's identity when last read: an edit changes at least one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

/// What the store knows of its file.
#[derive(Debug, Default)]
struct FileState {
    /// As last read or written (`None`: there was none).
    stamp: Option<Stamp>,
    /// Why the file as it is now cannot be used (it is then never overwritten).
    broken: Option<String>,
}

/// The keys file and the keys in force.
pub struct KeyStore {
    path: PathBuf,
    clock: SharedClock,
    /// Read (its `Arc` cloned) once per request; replaced whole by a load or a write.
    table: RwLock<Arc<Table>>,
    /// The file as last read or written; also serialises loads and writes, so an edit is never
    /// lost between reading the file and replacing it.
    file: Mutex<FileState>,
    /// Milliseconds since `started` before which the request path does not look at the file.
    next_check: AtomicU64,
    started: Instant,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl KeyStore {
    fn new(path: &Path, clock: SharedClock) -> KeyStore {
        KeyStore {
            path: path.to_path_buf(),
            clock,
            table: RwLock::new(Arc::default()),
            file: Mutex::default(),
            next_check: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// The store of `path`, loaded: a file that cannot be read or parsed is an error.
    pub fn open(path: &Path, clock: SharedClock) -> Result<KeyStore, KeysError> {
        let store = KeyStore::new(path, clock);
        store.reload_locked(&mut store.file.lock().expect("keys lock"), true)?;
        Ok(store)
    }

    /// The daemon's store: a file that cannot be used is logged and holds no keys until fixed
    /// (with `require_key`, every request is refused meanwhile: closed, not open); it is not
    /// overwritten.
    pub fn open_or_empty(path: &Path, clock: SharedClock) -> KeyStore {
        let store = KeyStore::new(path, clock);
        if let Err(e) = store.reload_locked(&mut store.file.lock().expect("keys lock"), true) {
            tracing::error!("{e}");
        }
        store
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key in force that `headers` present (see [`presented`]), or 401 `invalid_local_key`.
    /// Records its use.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<KeyEntry>, ProxyError> {
        self.notice_edits();
        let Some(key) = presented(headers) else {
            return Err(ProxyError::InvalidLocalKey(
                "this proxy requires a local key: send one made by `behest-agent key create` as the API key (Authorization: Bearer, api-key or x-api-key)".into(),
            ));
        };
        let digest = sha256(key);
        let entry = self.table.read().expect("keys lock").get(&digest).cloned();
        let now = self.clock.unix();
        match entry {
            Some(e) if !e.expired(now) => {
                e.last_used.store(now, Ordering::Relaxed);
                Ok(e)
            }
            Some(_) => Err(ProxyError::InvalidLocalKey(
                "the local key has expired: make a new one with `behest-agent key create`".into(),
            )),
            None => Err(ProxyError::InvalidLocalKey(
                "the local key is not valid (unknown or revoked): make one with `behest-agent key create`".into(),
            )),
        }
    }

    /// At most once per [`CHECK_EVERY`]: reads the file again when someone else changed it.
    fn notice_edits(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        let due = self.next_check.load(Ordering::Relaxed);
        if now < due
            || self
                .next_check
                .compare_exchange(
                    due,
                    now + CHECK_EVERY.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        // Another thread loading or writing right now will leave the table current.
        let Ok(mut file) = self.file.try_lock() else {
            return;
        };
        // A broken file is reported when it changes, not every second.
        if stamp_of(&self.path).ok() == Some(file.stamp) {
            return;
        }
        if let Err(e) = self.reload_locked(&mut file, true) {
            tracing::error!("{e}");
        }
    }

    /// Reads the file again if it changed since `stamp` (always, with `force`), and installs its
    /// keys; `last_used` kept in memory is carried over to the same ids. On error the table stays
    /// as it was, and the file is marked broken until it changes.
    fn reload_locked(&self, file: &mut FileState, force: bool) -> Result<(), KeysError> {
        let current = stamp_of(&self.path).map_err(|error| self.read_error(error))?;
        if !force && current == file.stamp {
            return match &file.broken {
                Some(reason) => Err(self.corrupt(reason.clone())),
                None => Ok(()),
            };
        }
        file.stamp = current;
        let loaded = self.load(current.is_some());
        file.broken = match &loaded {
            Err(KeysError::Corrupt { reason, .. }) => Some(reason.clone()),
            Err(e) => Some(e.to_string()),
            Ok(()) => None,
        };
        loaded
    }

    /// Reads the file (`exists`: else no keys) and installs its keys.
    fn load(&self, exists: bool) -> Result<(), KeysError> {
        let stored = match exists {
            false => Vec::new(),
            true => self.read()?,
        };
        let old = self.table.read().expect("keys lock").clone();
        let last: HashMap<&str, u64> = old
            .values()
            .map(|e| (e.id.as_str(), e.last_used.load(Ordering::Relaxed)))
            .collect();
        let mut table = Table::with_capacity(stored.len());
        for s in stored {
            let e = KeyEntry::from_stored(s).map_err(|reason| self.corrupt(reason))?;
            if let Some(t) = last.get(e.id.as_str()) {
                e.last_used.fetch_max(*t, Ordering::Relaxed);
            }
            if table.insert(e.sha256, Arc::new(e)).is_some() {
                return Err(self.corrupt("two keys have the same sha256".into()));
            }
        }
        *self.table.write().expect("keys lock") = Arc::new(table);
        Ok(())
    }

    fn read(&self) -> Result<Vec<Stored>, KeysError> {
        // Non-blocking: opening a FIFO planted here would wait for a writer.
        let mut f = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(&self.path)
            .map_err(|e| match e.raw_os_error() {
                Some(nix::libc::ELOOP) => self.corrupt(
                    "a symlink, which is never followed: put the file itself there".to_string(),
                ),
                _ => self.read_error(e),
            })?;
        // Only keys this user (or root) wrote are served.
        let meta = f.metadata().map_err(|e| self.read_error(e))?;
        if !meta.is_file() {
            return Err(self.corrupt("not a regular file: put the keys file itself there".into()));
        }
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(why) = crate::owner::untrusted_dir(dir.unwrap_or(Path::new("."))) {
            return Err(self.corrupt(format!(
                "{why}; keep the keys file in a directory only its owner may write"
            )));
        }
        if let Some(why) = crate::owner::untrusted(&meta) {
            return Err(self.corrupt(why));
        }
        let mut text = String::new();
        Read::by_ref(&mut f)
            .take(MAX_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|e| self.read_error(e))?;
        if text.len() as u64 > MAX_FILE {
            return Err(self.corrupt(format!("larger than {MAX_FILE} bytes")));
        }
        let model: FileModel =
            serde_json::from_str(&text).map_err(|e| self.corrupt(e.to_string()))?;
        if model.version != 1 {
            return Err(self.corrupt(format!("version {} is not 1", model.version)));
        }
        Ok(model.keys)
    }

    fn read_error(&self, error: std::io::Error) -> KeysError {
        KeysError::Read {
            path: self.path.display().to_string(),
            error,
        }
    }

    fn corrupt(&self, reason: String) -> KeysError {
        KeysError::Corrupt {
            path: self.path.display().to_string(),
            reason,
        }
    }

    /// Makes a key, writes it to the file and puts it in force; returns the key (shown once) and
    /// its entry.
    pub fn create(&self, new: NewKey) -> Result<(String, Arc<KeyEntry>), KeysError> {
        new.check()?;
        let mut bytes = [0u8; KEY_BYTES];
        random_fill(&mut bytes)?;
        let key = format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        );
        let mut id = [0u8; 6];
        random_fill(&mut id)?;
        let now = self.clock.unix();
        let stored = Stored {
            id: hex(&id),
            name: new.name,
            profile: new.profile,
            session: new.session,
            sha256: hex(&sha256(key.as_bytes())),
            created_at: now,
            // At least the TTL asked: `now` is the second begun, so one more second (a key made
            // at :12.9 with 1s lived 0.1 s), and the TTL rounded up.
            expires_at: new.ttl.map(|t| {
                let secs = t.as_secs() + u64::from(t.subsec_nanos() > 0);
                now.saturating_add(secs.max(1)).saturating_add(1)
            }),
            last_used: None,
        };
        let entry = Arc::new(KeyEntry::from_stored(stored).map_err(KeysError::Invalid)?);
        let added = entry.clone();
        self.update(move |table| {
            table.insert(added.sha256, added);
            Ok(())
        })?;
        Ok((key, entry))
    }

    /// Removes the key `id`; refused on the next request.
    pub fn revoke(&self, id: &str) -> Result<(), KeysError> {
        self.update(|table| {
            let before = table.len();
            table.retain(|_, e| e.id != id);
            if table.len() == before {
                return Err(KeysError::NoSuchKey(id.to_string()));
            }
            Ok(())
        })
    }

    /// The keys (never the key nor its hash), oldest first, after reading any edit of the file.
    pub fn list(&self) -> Result<Vec<Value>, KeysError> {
        {
            let mut file = self.file.lock().expect("keys lock");
            self.reload_locked(&mut file, false)?;
        }
        let table = self.table.read().expect("keys lock").clone();
        let mut entries: Vec<&Arc<KeyEntry>> = table.values().collect();
        entries.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        let now = self.clock.unix();
        Ok(entries.iter().map(|e| e.view(now)).collect())
    }

    /// Writes `last_used` to the file (when the daemon stops).
    pub fn persist(&self) -> Result<(), KeysError> {
        if self.table.read().expect("keys lock").is_empty() {
            return Ok(());
        }
        self.update(|_| Ok(()))
    }

    /// Reads any edit of the file, changes the table, writes the file, then puts the new table
    /// in force. A file that cannot be read or parsed is never overwritten.
    fn update(
        &self,
        change: impl FnOnce(&mut Table) -> Result<(), KeysError>,
    ) -> Result<(), KeysError> {
        let mut file = self.file.lock().expect("keys lock");
        // Another process (a CLI without a daemon, `exec`'s own proxy) may edit the file too:
        // each edit reads the file again under the lock, so none is lost.
        let _edit =
            crate::lockfile::lock_blocking(&crate::lockfile::path_for(&self.path), LOCK_WAIT)
                .map_err(|error| KeysError::Write {
                    path: self.path.display().to_string(),
                    error,
                })?;
        self.reload_locked(&mut file, true)?;
        let mut table: Table = (**self.table.read().expect("keys lock")).clone();
        change(&mut table)?;
        let mut keys: Vec<Stored> = table.values().map(|e| e.to_stored()).collect();
        keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        let text = serde_json::to_string_pretty(&FileModel { version: 1, keys })
            .expect("the keys serialise");
        write_atomically(&self.path, text.as_bytes()).map_err(|error| KeysError::Write {
            path: self.path.display().to_string(),
            error,
        })?;
        file.stamp = stamp_of(&self.path).map_err(|e| self.read_error(e))?;
        *self.table.write().expect("keys lock") = Arc::new(table);
        Ok(())
    }
}

/// The key a request presents: `Authorization: Bearer KEY`, else `api-key`, else `x-api-key` (the
/// first of them that holds one is the one looked up).
pub fn presented(headers: &HeaderMap) -> Option<&[u8]> {
    let bearer = headers.get(AUTHORIZATION).and_then(|v| {
        let v = v.as_bytes();
        v.get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
            .map(|_| v[7..].trim_ascii())
    });
    // A `Basic` or empty `Authorization` presents no key: the next header may.
    [
        bearer,
        headers.get(API_KEY).map(|v| v.as_bytes().trim_ascii()),
        headers.get(X_API_KEY).map(|v| v.as_bytes().trim_ascii()),
    ]
    .into_iter()
    .flatten()
    .find(|k| !k.is_empty())
}

/// The profile a request uses: the path's (`/p/NAME/`, passed by the profile router), else the
/// key's. A key bound to a profile may not name another: 403 `forbidden_profile`.
pub fn effective_profile(
    key_profile: Option<&str>,
    path_profile: Option<&str>,
) -> Result<Option<String>, ProxyError> {
    match (key_profile, path_profile) {
        (Some(k), Some(p)) if k != p => Err(ProxyError::ForbiddenProfile(format!(
            "this local key is bound to profile `{k}`; it may not use profile `{}`",
            p.escape_debug()
        ))),
        (_, Some(p)) => Ok(Some(p.to_string())),
        (Some(k), None) => Ok(Some(k.to_string())),
        (None, None) => Ok(None),
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

fn random_fill(buf: &mut [u8]) -> Result<(), KeysError> {
    use aws_lc_rs::rand::SecureRandom as _;
    aws_lc_rs::rand::SystemRandom::new()
        .fill(buf)
        .map_err(|_| KeysError::Invalid("the system's random generator failed".into()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn stamp_of(path: &Path) -> std::io::Result<Option<Stamp>> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces `path` with `bytes`: a new 0600 file beside it, fsynced, renamed over it (a symlink
/// at `path` is replaced, not followed), then the directory fsynced. The directory is made (0700)
/// when missing.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "keys.json".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", fastrand::u64(..)));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> KeyStore {
        KeyStore::open(&dir.join("keys.json"), crate::clock::system()).unwrap()
    }

    fn bearer(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
        );
        h
    }

    #[test]
    fn a_key_is_the_prefix_and_32_random_bytes_in_base64url() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let (a, _) = s.create(NewKey::default()).unwrap();
        let (b, _) = s.create(NewKey::default()).unwrap();
        assert_ne!(a, b);
        let body = a.strip_prefix(PREFIX).unwrap();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .unwrap();
        assert_eq!(bytes.len(), 32);
    }

    #[test]
    fn edits_by_several_processes_at_once_are_never_lost() {
        // Two stores on one file stand for two processes (CLIs without a daemon, `exec`s).
        let dir = tempfile::tempdir().unwrap();
        let edits = |_| {
            let s = store(dir.path());
            move || {
                for _ in 0..10 {
                    let (_, e) = s.create(NewKey::default()).unwrap();
                    s.create(NewKey::default()).unwrap();
                    s.revoke(&e.id).unwrap();
                }
            }
        };
        let writers: Vec<_> = (0..4).map(edits).map(std::thread::spawn).collect();
        for w in writers {
            w.join().unwrap();
        }
        assert_eq!(store(dir.path()).list().unwrap().len(), 40);
    }

    #[test]
    fn a_created_key_is_accepted_and_a_revoked_one_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let (key, e) = s.create(NewKey::default()).unwrap();
        assert_eq!(s.authenticate(&bearer(&key)).unwrap().id, e.id);
        s.revoke(&e.id).unwrap();
        let err = s.authenticate(&bearer(&key)).unwrap_err();
        assert_eq!(err.code(), "invalid_local_key");
        assert!(matches!(s.revoke(&e.id), Err(KeysError::NoSuchKey(_))));
    }

    #[test]
    fn the_file_holds_the_hash_not_the_key_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let (key, _) = s.create(NewKey::default()).unwrap();
        let text = std::fs::read_to_string(s.path()).unwrap();
        assert!(!text.contains(&key));
        assert!(!text.contains(key.strip_prefix(PREFIX).unwrap()));
        assert!(text.contains(&hex(&sha256(key.as_bytes()))));
        let mode = std::fs::metadata(s.path()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_corrupt_file_is_refused_and_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        std::fs::write(&path, "{not json").unwrap();
        let e = KeyStore::open(&path, crate::clock::system()).unwrap_err();
        assert!(e.to_string().contains("not valid"), "{e}");
        let s = KeyStore::open_or_empty(&path, crate::clock::system());
        assert!(s.create(NewKey::default()).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{not json");
        // A symlink is never followed, and the error says what to do.
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let e = KeyStore::open(&link, crate::clock::system()).unwrap_err();
        assert!(
            e.to_string().contains("a symlink, which is never followed"),
            "{e}"
        );
    }

    #[test]
    fn a_keys_file_other_users_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let (key, _) = KeyStore::open_or_empty(&path, crate::clock::system())
            .create(NewKey::default())
            .unwrap();
        // Another user, say, planted it writable for all in a shared directory.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = KeyStore::open(&path, crate::clock::system()).unwrap_err();
        assert!(e.to_string().contains("other users may write it"), "{e}");
        let s = KeyStore::open_or_empty(&path, crate::clock::system());
        let mut h = HeaderMap::new();
        h.insert(API_KEY, HeaderValue::from_str(&key).unwrap());
        assert!(s.authenticate(&h).is_err(), "its keys are not served");
    }

    #[test]
    fn the_key_is_read_from_bearer_then_api_key_then_x_api_key() {
        let mut h = HeaderMap::new();
        assert_eq!(presented(&h), None);
        h.insert(X_API_KEY, HeaderValue::from_static("c"));
        assert_eq!(presented(&h), Some(&b"c"[..]));
        h.insert(API_KEY, HeaderValue::from_static("b"));
        assert_eq!(presented(&h), Some(&b"b"[..]));
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer a"));
        assert_eq!(presented(&h), Some(&b"a"[..]));
        // A `Basic` or empty Bearer presents no key: the `api-key` sent beside it is checked (it
        // was hidden, and the 401 said no key was sent).
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic a"));
        assert_eq!(presented(&h), Some(&b"b"[..]));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(presented(&h), Some(&b"b"[..]));
        h.remove(API_KEY);
        h.remove(X_API_KEY);
        assert_eq!(presented(&h), None);
    }

    #[test]
    fn a_profile_bound_key_selects_its_profile_and_refuses_another() {
        assert_eq!(effective_profile(None, None).unwrap(), None);
        assert_eq!(
            effective_profile(None, Some("b")).unwrap().as_deref(),
            Some("b")
        );
        assert_eq!(
            effective_profile(Some("a"), None).unwrap().as_deref(),
            Some("a")
        );
        assert_eq!(
            effective_profile(Some("a"), Some("a")).unwrap().as_deref(),
            Some("a")
        );
        let e = effective_profile(Some("a"), Some("b")).unwrap_err();
        assert_eq!((e.status().as_u16(), e.code()), (403, "forbidden_profile"));
    }

    #[test]
    fn bad_labels_are_refused() {
        for bad in [
            NewKey {
                session: Some("a b".into()),
                ..NewKey::default()
            },
            NewKey {
                profile: Some("a/b".into()),
                ..NewKey::default()
            },
            NewKey {
                ttl: Some(Duration::ZERO),
                ..NewKey::default()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
