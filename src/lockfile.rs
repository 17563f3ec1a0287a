//! Cross-process locks: an exclusive `flock` on `FILE.lock` beside the file it guards (the disk
//! cache's grants, the keys file's edits). The lock file is created 0600 (its directory 0700 when
//! missing) and never followed through a symlink; no wait on it is without bound.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often a waiter tries the lock again (jittered by half either way).
pub const POLL: Duration = Duration::from_millis(25);

/// `FILE.lock`, beside `file`.
pub fn path_for(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_os_string();
    name.push(".lock");
    PathBuf::from(name)
}

/// Opens the lock file `path`, creating it (and its directory) when missing.
pub fn open(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    // One another user planted could be held by them forever.
    crate::owner::check(path, &file.metadata()?)?;
    Ok(file)
}

/// Takes the lock `path`, waiting at most `wait`; held until the file is dropped. It blocks the
/// thread: for short critical sections, off the event loop.
pub fn lock_blocking(path: &Path, wait: Duration) -> std::io::Result<File> {
    let file = open(path)?;
    let end = Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < end => {
                std::thread::sleep(POLL.mul_f64(0.5 + fastrand::f64()))
            }
            Err(std::fs::TryLockError::WouldBlock) => return Err(held(path, wait)),
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// The error of a wait that ran out: it names the lock file.
pub fn held(path: &Path, wait: Duration) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "another process has held {} for {} (a stopped or stuck behest-agent?)",
            path.display(),
            humantime::format_duration(wait)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_waited_for_within_the_bound_then_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("state/keys.json"));
        let held_here = lock_blocking(&path, Duration::from_secs(1)).unwrap();
        let e = lock_blocking(&path, Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("keys.json.lock"), "{e}");
        drop(held_here);
        lock_blocking(&path, Duration::from_millis(50)).unwrap();
    }

    #[test]
    fn a_symlink_at_the_lock_path_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        let path = dir.path().join("keys.json.lock");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(open(&path).is_err());
        assert!(!target.exists());
    }
}
