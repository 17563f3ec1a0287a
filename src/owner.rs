//! What another local user could have planted or may change is not trusted: the keys file, the
//! usage ledger, lock files and the control socket's directory must belong to this process's user
//! or root, and a file must not be writable by group or others.

use std::os::unix::fs::MetadataExt;

/// Why the file or directory `meta` describes is not to be trusted; `None` when it may be.
pub fn untrusted(meta: &std::fs::Metadata) -> Option<String> {
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Some(format!(
            "it belongs to uid {}, neither this user (uid {me}) nor root: another user may have put it there; remove it",
            meta.uid()
        ));
    }
    if meta.is_file() && meta.mode() & 0o022 != 0 {
        return Some(format!(
            "other users may write it (mode {:04o}); remove it, or `chmod go-w` it",
            meta.mode() & 0o7777
        ));
    }
    None
}

/// Why another user could replace the directory `dir` itself, with what is in it: an ancestor
/// of it that another user owns, or one every user may write without the sticky bit (which lets
/// only an entry's owner rename it, as in `/tmp`). `None` when none can.
pub fn untrusted_ancestor(dir: &std::path::Path) -> Option<String> {
    movable(dir, 1)
}

/// [`untrusted_ancestor`] of `dir` and `dir` itself: whether another user could move or remove
/// what is in it (the keys file).
pub fn untrusted_dir(dir: &std::path::Path) -> Option<String> {
    movable(dir, 0)
}

fn movable(dir: &std::path::Path, skip: usize) -> Option<String> {
    let me = nix::unistd::geteuid().as_raw();
    let real = std::fs::canonicalize(dir).ok()?;
    for a in real.ancestors().skip(skip) {
        let meta = std::fs::metadata(a).ok()?;
        if meta.uid() != me && meta.uid() != 0 {
            return Some(format!(
                "{} belongs to uid {}, neither this user (uid {me}) nor root: that user could move what is below it",
                a.display(),
                meta.uid()
            ));
        }
        if meta.mode() & 0o002 != 0 && meta.mode() & 0o1000 == 0 {
            return Some(format!(
                "{} is writable by every user without the sticky bit (mode {:04o}): any user could move what is below it",
                a.display(),
                meta.mode() & 0o7777
            ));
        }
    }
    None
}

/// [`untrusted`] as an I/O error (permission denied) naming `path`.
pub fn check(path: &std::path::Path, meta: &std::fs::Metadata) -> std::io::Result<()> {
    match untrusted(meta) {
        None => Ok(()),
        Some(why) => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{}: {why}", path.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_file_others_may_write_or_another_user_owns_is_untrusted() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "").unwrap();
        for (mode, trusted) in [(0o600, true), (0o644, true), (0o620, false), (0o602, false)] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            let why = untrusted(&std::fs::metadata(&f).unwrap());
            assert_eq!(why.is_none(), trusted, "{mode:o}: {why:?}");
        }
        // A directory may be group-writable (the service's group); the socket's checks its mode.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o770)).unwrap();
        assert_eq!(untrusted(&std::fs::metadata(dir.path()).unwrap()), None);
        if nix::unistd::geteuid().is_root() {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
            std::os::unix::fs::chown(&f, Some(65534), None).unwrap();
            let why = untrusted(&std::fs::metadata(&f).unwrap()).unwrap();
            assert!(why.contains("uid 65534"), "{why}");
            let e = check(&f, &std::fs::metadata(&f).unwrap()).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
        } else {
            eprintln!("SKIPPED the other-owner half: only root can chown a file to another user");
        }
    }
}
