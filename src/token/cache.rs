//! The disk cache: the last good token, so restarts and one-shot CLI calls do not spend the tenant's
//! machine-to-machine quota. One JSON file, mode 0600, replaced atomically (write + fsync + rename),
//! keyed by everything that changes what token the IdP would issue; a neighbouring `.lock` file
//! serializes grants across processes. A loaded token is checked again before it is served.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// What the cached token was issued for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheKey {
    pub issuer: String,
    pub client_id: String,
    pub audience: Option<String>,
    pub resource: Option<String>,
    pub organization: Option<String>,
    pub scope: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    key: CacheKey,
    access_token: String,
    obtained_at: u64,
}

/// A cached token, not yet checked.
pub struct Cached {
    pub access_token: SecretString,
    pub obtained_at: SystemTime,
}

#[derive(Debug, Clone)]
pub struct DiskCache {
    path: PathBuf,
    key: CacheKey,
}

/// Holds the cross-process lock until dropped.
#[derive(Debug)]
pub struct CacheLock {
    _file: File,
}

impl DiskCache {
    pub fn new(path: PathBuf, key: CacheKey) -> Self {
        Self { path, key }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cached token for this key, if any. A missing, unreadable, corrupt or foreign file is
    /// simply no token.
    pub fn load(&self) -> Option<Cached> {
        let text = std::fs::read(&self.path).ok()?;
        let file: CacheFile = match serde_json::from_slice(&text) {
            Ok(f) => f,
            Err(_) => {
                tracing::warn!(path = %self.path.display(), "the token cache file is corrupt; ignoring it");
                return None;
            }
        };
        if file.version != 1 || file.key != self.key {
            tracing::debug!(path = %self.path.display(), "the token cache holds a token for another configuration");
            return None;
        }
        Some(Cached {
            access_token: SecretString::from(file.access_token),
            obtained_at: crate::clock::from_unix(file.obtained_at)?,
        })
    }

    /// Writes the token atomically with mode 0600.
    pub fn store(&self, token: &SecretString, obtained_at: SystemTime) -> std::io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        ensure_dir(dir)?;
        let file = CacheFile {
            version: 1,
            key: self.key.clone(),
            access_token: token.expose_secret().to_string(),
            obtained_at: obtained_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        };
        let body = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
        let tmp = dir.join(format!(
            ".{}.{}.{}.tmp",
            self.path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("token.json"),
            std::process::id(),
            fastrand::u64(..)
        ));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            // The rename is durable once the directory is synced.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// [`DiskCache::store`] on the blocking pool: the `fsync`s must not stall the event loop that
    /// serves the proxy.
    pub async fn store_async(
        &self,
        token: &SecretString,
        obtained_at: SystemTime,
    ) -> std::io::Result<()> {
        let (this, token) = (self.clone(), token.clone());
        tokio::task::spawn_blocking(move || this.store(&token, obtained_at))
            .await
            .map_err(std::io::Error::other)?
    }

    /// Removes the cached token (it failed its checks).
    pub fn discard(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// Takes the cross-process grant lock (blocking; call from `spawn_blocking`).
    pub fn lock_blocking(&self) -> std::io::Result<CacheLock> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        ensure_dir(dir)?;
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(".lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join(name))?;
        file.lock()?;
        Ok(CacheLock { _file: file })
    }

    /// Takes the cross-process grant lock without blocking the runtime.
    pub async fn lock(&self) -> std::io::Result<CacheLock> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.lock_blocking())
            .await
            .map_err(std::io::Error::other)?
    }
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
