//! The disk cache: the last good token, so restarts and one-shot CLI calls do not spend the tenant's
//! machine-to-machine quota, and keep working while the IdP is down. One JSON file, mode 0600,
//! replaced atomically (write + fsync + rename), keyed by everything that changes what token the IdP
//! would issue. Beside the token it keeps the issuer's public key that verified it when it was
//! written, so a loaded token is checked again (signature included) without the network. A
//! neighbouring `.lock` file serializes grants across processes; it is never followed through a
//! symlink and never waited on without bound.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use jsonwebtoken::jwk::Jwk;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::auth::http::MAX_WAIT_HINT;

/// Who a token is for: what makes two configurations get different tokens from the IdP. It keys
/// the disk cache entry, and a daemon reports it in `/v1/status` (`daemon.identity`) for the CLI
/// to compare with its own configuration's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub issuer: String,
    pub client_id: String,
    pub audience: Option<String>,
    pub resource: Option<String>,
    pub organization: Option<String>,
    pub scope: Option<String>,
}

impl Identity {
    pub fn of(auth: &crate::config::AuthSettings) -> Identity {
        Identity {
            issuer: auth.endpoints.issuer_hint(),
            client_id: auth.client_id.clone(),
            audience: auth.audience.clone(),
            resource: auth.resource.clone(),
            organization: auth.organization.clone(),
            scope: auth.scope.clone(),
        }
    }

    /// The fields that differ, as `(key, this one's value, other's value)`; `-` for none.
    pub fn differences(&self, other: &Identity) -> Vec<(&'static str, String, String)> {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        [
            ("issuer", self.issuer.clone(), other.issuer.clone()),
            ("client_id", self.client_id.clone(), other.client_id.clone()),
            ("audience", show(&self.audience), show(&other.audience)),
            ("resource", show(&self.resource), show(&other.resource)),
            (
                "organization",
                show(&self.organization),
                show(&other.organization),
            ),
            ("scope", show(&self.scope), show(&other.scope)),
        ]
        .into_iter()
        .filter(|(_, a, b)| a != b)
        .collect()
    }
}

/// The file. New fields are optional, so an older agent sharing the file still reads it.
#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    key: Identity,
    access_token: String,
    obtained_at: u64,
    /// The issuer's public key (from its JWKS) that verified the token when it was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    verified_with: Option<Jwk>,
    /// The token came from a forced grant (`refresh`, `token --min-ttl`): another process asking
    /// for one shortly after shares it instead of granting again.
    #[serde(default)]
    forced: bool,
    /// [`credential_mark`] of the client credential the token was granted with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    credential: Option<String>,
}

/// The waits kept at most: one per client credential recently told to wait.
const MAX_WAITS: usize = 8;

/// A grant the IdP answered with a wait (`Retry-After`), kept in `FILE.wait` so that every engine
/// on this cache (one-shot commands, a reload's new engine) honours it instead of asking again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wait {
    key: Identity,
    /// [`credential_mark`] of the credential that was refused: another one may ask at once.
    credential: Option<String>,
    /// When the IdP said to wait, in Unix seconds.
    #[serde(default)]
    at: u64,
    /// Unix seconds.
    until: u64,
    pub code: String,
    pub message: String,
}

impl Wait {
    /// When the wait ends: at most [`MAX_WAIT_HINT`] after it was told, and never for a wait
    /// told in the future (a clock that was ahead, a planted file), which would hold for ever.
    fn end(&self, now: SystemTime) -> Option<SystemTime> {
        let at = crate::clock::from_unix(self.at).filter(|at| *at <= now)?;
        let until = crate::clock::from_unix(self.until)?.min(at + MAX_WAIT_HINT);
        (until > now).then_some(until)
    }

    fn runs_at(&self, now: SystemTime) -> bool {
        self.end(now).is_some()
    }
}

/// A cached token, not yet checked.
#[derive(Clone)]
pub struct Cached {
    pub access_token: SecretString,
    pub obtained_at: SystemTime,
    /// The key that verified the token when it was written (none when signatures are not checked,
    /// or from an older agent).
    pub verified_with: Option<Jwk>,
    pub forced: bool,
    /// [`credential_mark`] of the credential it was granted with (none from an older agent).
    pub credential: Option<String>,
}

/// A mark of the client credential (secret or private key) that tells whether a cached token was
/// granted with the one configured now, and reveals nothing of it: HMAC-SHA256 keyed by it. A
/// token granted with another secret is not served: a wrong or revoked secret fails at once
/// rather than when the cached token expires.
pub fn credential_mark(credential: &[u8]) -> String {
    use aws_lc_rs::hmac;
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, credential),
        b"behest-agent token cache credential",
    );
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Clone)]
pub struct DiskCache {
    path: PathBuf,
    key: Identity,
    /// Why the file was last not used, as logged: said once while it stays the same (a start
    /// reads the file more than once).
    refused: Arc<Mutex<Option<String>>>,
}

/// Holds the cross-process lock until dropped.
#[derive(Debug)]
pub struct CacheLock {
    _file: File,
}

impl DiskCache {
    pub fn new(path: PathBuf, key: Identity) -> Self {
        Self {
            path,
            key,
            refused: Arc::default(),
        }
    }

    /// Logs why the file is not used, unless that was the last reason logged.
    fn refuse(&self, why: String) {
        let mut last = self.refused.lock().expect("cache warning lock");
        if last.as_deref() != Some(why.as_str()) {
            tracing::warn!(path = %self.path.display(), "{why}");
            *last = Some(why);
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    fn lock_path(&self) -> PathBuf {
        crate::lockfile::path_for(&self.path)
    }

    /// The cached token for this key, if any. A missing, unreadable, corrupt or foreign file is
    /// simply no token; so is one other users may read (its token may have been read: the next
    /// grant replaces it with a 0600 file) or one another user owns.
    pub fn load(&self) -> Option<Cached> {
        use std::io::Read as _;
        use std::os::unix::fs::MetadataExt as _;
        // Non-blocking: opening a FIFO planted here would wait for a writer.
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(&self.path)
            .ok()?;
        let meta = f.metadata().ok()?;
        if !meta.is_file() {
            self.refuse("not using the token cache path: it is not a regular file (a directory or a FIFO?); remove it, or set token.cache_file to a file's path".into());
            return None;
        }
        let exposed = (meta.mode() & 0o077 != 0).then(|| {
            format!(
                "other users may read it (mode {:04o})",
                meta.mode() & 0o7777
            )
        });
        if let Some(why) = crate::owner::untrusted(&meta).or(exposed) {
            self.refuse(format!(
                "not using the token cache file: {why}; the next grant replaces it with a 0600 one"
            ));
            return None;
        }
        let mut text = Vec::new();
        f.take(1 << 20).read_to_end(&mut text).ok()?;
        let file: CacheFile = match serde_json::from_slice(&text) {
            Ok(f) => f,
            Err(_) => {
                self.refuse("the token cache file is corrupt; ignoring it".into());
                return None;
            }
        };
        *self.refused.lock().expect("cache warning lock") = None;
        if file.version != 1 || file.key != self.key {
            tracing::debug!(path = %self.path.display(), "the token cache holds a token for another configuration");
            return None;
        }
        Some(Cached {
            access_token: SecretString::from(file.access_token),
            obtained_at: crate::clock::from_unix(file.obtained_at)?,
            verified_with: file.verified_with,
            forced: file.forced,
            credential: file.credential,
        })
    }

    /// Writes the entry atomically with mode 0600.
    pub fn store(&self, entry: &Cached) -> std::io::Result<()> {
        let dir = self.dir();
        ensure_dir(dir)?;
        self.not_a_directory()?;
        let file = CacheFile {
            version: 1,
            key: self.key.clone(),
            access_token: entry.access_token.expose_secret().to_string(),
            obtained_at: entry
                .obtained_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            verified_with: entry.verified_with.clone(),
            forced: entry.forced,
            credential: entry.credential.clone(),
        };
        let body = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
        write_new(dir, &self.temp_name(), &body, Some(&self.path))
    }

    /// [`DiskCache::store`] on the blocking pool: the `fsync`s must not stall the event loop that
    /// serves the proxy.
    pub async fn store_async(&self, entry: &Cached) -> std::io::Result<()> {
        let (this, entry) = (self.clone(), entry.clone());
        tokio::task::spawn_blocking(move || this.store(&entry))
            .await
            .map_err(std::io::Error::other)?
    }

    /// Whether the cache could be written now: writes, syncs and removes a small file beside it
    /// (the cache itself is left alone). The error says why not (read-only, full, not a directory).
    pub fn probe_writable(&self) -> std::io::Result<()> {
        let dir = self.dir();
        ensure_dir(dir)?;
        self.not_a_directory()?;
        write_new(dir, &self.temp_name(), &[0u8; 512], None)
    }

    /// A directory at the path: the same words whether a write or a probe finds it.
    fn not_a_directory(&self) -> std::io::Result<()> {
        if self.path.is_dir() {
            return Err(std::io::Error::other(
                "it is a directory, so a token cannot be written there",
            ));
        }
        Ok(())
    }

    fn temp_name(&self) -> String {
        format!(
            ".{}.{}.{}.tmp",
            self.path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("token.json"),
            std::process::id(),
            fastrand::u64(..)
        )
    }

    fn wait_path(&self) -> PathBuf {
        let mut name = self.path.as_os_str().to_os_string();
        name.push(".wait");
        PathBuf::from(name)
    }

    /// Keeps a failed grant's wait for the engines on this cache (best effort), beside those of
    /// other credentials still running (a rotated secret must not free the old one from its wait).
    pub fn store_wait(
        &self,
        now: SystemTime,
        until: SystemTime,
        credential: Option<String>,
        code: &str,
        message: &str,
    ) {
        let mut waits: Vec<Wait> = self
            .read_waits()
            .into_iter()
            .filter(|w| w.credential != credential && w.runs_at(now))
            .collect();
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
        };
        waits.push(Wait {
            key: self.key.clone(),
            credential,
            at: unix(now),
            until: unix(until),
            code: code.to_string(),
            message: message.to_string(),
        });
        let keep = waits.len().saturating_sub(MAX_WAITS);
        if let Ok(body) = serde_json::to_vec(&waits[keep..]) {
            let _ = ensure_dir(self.dir()).and_then(|()| {
                write_new(
                    self.dir(),
                    &self.temp_name(),
                    &body,
                    Some(&self.wait_path()),
                )
            });
        }
    }

    /// The wait a grant for this key and `credential` was told, and when it ends, when it still
    /// runs at `now` (at most [`MAX_WAIT_HINT`] after it was told, whatever the file says).
    pub fn wait(&self, credential: Option<&str>, now: SystemTime) -> Option<(SystemTime, Wait)> {
        let wait = self.read_waits().into_iter().find(|w| {
            w.key == self.key && w.credential.as_deref() == credential && w.runs_at(now)
        })?;
        Some((wait.end(now)?, wait))
    }

    /// The kept waits. Read as the token is: never through a symlink or from a file another user
    /// could write.
    fn read_waits(&self) -> Vec<Wait> {
        use std::io::Read as _;
        use std::os::unix::fs::MetadataExt as _;
        let Ok(f) = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(self.wait_path())
        else {
            return Vec::new();
        };
        let trusted = f.metadata().is_ok_and(|meta| {
            meta.is_file() && meta.mode() & 0o022 == 0 && crate::owner::untrusted(&meta).is_none()
        });
        let mut text = Vec::new();
        if !trusted || f.take(64 << 10).read_to_end(&mut text).is_err() {
            return Vec::new();
        }
        serde_json::from_slice(&text).unwrap_or_default()
    }

    /// Forgets a kept wait (a grant succeeded).
    pub fn clear_wait(&self) {
        let _ = std::fs::remove_file(self.wait_path());
    }

    /// Removes the cached token (it failed its checks).
    pub fn discard(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// Takes the cross-process grant lock, waiting at most `wait` for the process holding it (which
    /// may be stopped, or stuck); the error then names the lock file.
    pub async fn lock(&self, wait: Duration) -> std::io::Result<CacheLock> {
        let this = self.clone();
        let file = tokio::task::spawn_blocking(move || crate::lockfile::open(&this.lock_path()))
            .await
            .map_err(std::io::Error::other)??;
        let taken = tokio::time::timeout(wait, async {
            loop {
                match file.try_lock() {
                    Ok(()) => return Ok(()),
                    Err(std::fs::TryLockError::WouldBlock) => {
                        tokio::time::sleep(crate::lockfile::POLL.mul_f64(0.5 + fastrand::f64()))
                            .await
                    }
                    Err(std::fs::TryLockError::Error(e)) => return Err(e),
                }
            }
        })
        .await;
        match taken {
            Ok(Ok(())) => Ok(CacheLock { _file: file }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(crate::lockfile::held(&self.lock_path(), wait)),
        }
    }
}

/// Writes `body` to a new file `name` in `dir` (0600), syncs it, and renames it to `to` (the
/// rename made durable by syncing the directory) or removes it when `to` is `None`.
fn write_new(dir: &Path, name: &str, body: &[u8], to: Option<&Path>) -> std::io::Result<()> {
    let tmp = dir.join(name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
        if let Some(to) = to {
            std::fs::rename(&tmp, to)?;
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    })();
    if result.is_err() || to.is_none() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn ensure_dir(dir: &Path) -> std::io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(dir: &Path) -> DiskCache {
        let key = Identity {
            issuer: "https://idp.example/".into(),
            client_id: "c1".into(),
            audience: None,
            resource: None,
            organization: None,
            scope: None,
        };
        DiskCache::new(dir.join("token.json"), key)
    }

    #[test]
    fn waits_are_kept_per_credential_and_never_read_past_an_hour() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path());
        let now = SystemTime::now();
        let year = Duration::from_secs(365 * 86400);
        c.store_wait(now, now + year, Some("a".into()), "too_many_requests", "A");
        c.store_wait(
            now,
            now + Duration::from_secs(60),
            Some("b".into()),
            "too_many_requests",
            "B",
        );
        // The other credential's wait did not replace this one's.
        let (until, wait) = c.wait(Some("a"), now).unwrap();
        assert_eq!(wait.message, "A");
        assert!(until <= now + MAX_WAIT_HINT, "capped where it is read");
        assert_eq!(c.wait(Some("b"), now).unwrap().1.message, "B");
        assert!(c.wait(Some("c"), now).is_none());
        assert!(c.wait(Some("b"), now + Duration::from_secs(61)).is_none());
        // An hour after it was told, a year's wait is over (it does not move with each read).
        assert!(c.wait(Some("a"), now + MAX_WAIT_HINT).is_none());
        // One told in the future (a clock that was ahead) is not honoured at all.
        c.store_wait(
            now + year,
            now + year,
            Some("d".into()),
            "too_many_requests",
            "D",
        );
        assert!(c.wait(Some("d"), now).is_none());
        c.clear_wait();
        assert!(c.wait(Some("a"), now).is_none());
    }
}
