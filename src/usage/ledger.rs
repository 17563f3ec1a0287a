//! The usage ledger (`usage.ledger_file`): one JSON line per accounted response, appended by one
//! writer on tokio's blocking pool so the proxy never waits for the disk. The file is created
//! 0600 (never through a symlink) and, past `usage.ledger_max_size`, renamed to `FILE.1` (the
//! previous `.1` is replaced) and started again. A line never holds a prompt, a completion or a
//! credential. Lines are written in batches, at most one write per [`BATCH_INTERVAL`]; when the
//! disk is slower than the responses, lines past [`QUEUE`] are dropped and counted, never queued
//! without bound.

use std::io::{BufRead, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{NO_SESSION, Report, Tokens};

/// Lines waiting for the writer.
const QUEUE: usize = 16384;
/// How long lines gather between two writes.
const BATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// One ledger line (SPEC §8); token fields are null when the response carried no usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub ts: String,
    pub session: String,
    pub profile: String,
    pub model: Option<String>,
    pub path: String,
    pub status: u16,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub total_tokens: Option<u64>,
    pub duration_ms: u64,
    pub request_id: String,
}

// A flush is rare; boxing the line instead would cost an allocation per response.
#[allow(clippy::large_enum_variant)]
enum Msg {
    /// A line, its `ts` still to be written from the time (off the proxy's thread).
    Line(std::time::SystemTime, Line),
    Flush(oneshot::Sender<()>),
}

/// The handle the accounting appends through.
pub struct Ledger {
    tx: mpsc::Sender<Msg>,
    dropped: AtomicU64,
}

impl Ledger {
    /// Starts the writer (on the current runtime's blocking pool).
    pub fn start(path: PathBuf, max_size: u64) -> Ledger {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::task::spawn_blocking(move || Writer::new(path, max_size).run(rx));
        Ledger {
            tx,
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues a line; `at` becomes its `ts`.
    pub fn append(&self, at: std::time::SystemTime, line: Line) {
        if self.tx.try_send(Msg::Line(at, line)).is_err()
            && self.dropped.fetch_add(1, Ordering::Relaxed) == 0
        {
            tracing::warn!(
                "the usage ledger's writer falls behind (or stopped): lines are being dropped; the in-memory counts and `behest-agent usage` are unaffected"
            );
        }
    }

    /// Returns once every line appended before has been written (or failed).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

struct Writer {
    path: PathBuf,
    max_size: u64,
    file: Option<std::fs::File>,
    failing: bool,
}

impl Writer {
    fn new(path: PathBuf, max_size: u64) -> Writer {
        Writer {
            path,
            max_size,
            file: None,
            failing: false,
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut batch = Vec::new();
        let mut flushed = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            // What came meanwhile goes out in the same write.
            let mut next = Some(first);
            while let Some(msg) = next {
                match msg {
                    Msg::Line(at, mut line) => {
                        line.ts = crate::token::rfc3339(at);
                        if serde_json::to_writer(&mut batch, &line).is_ok() {
                            batch.push(b'\n');
                        }
                    }
                    Msg::Flush(done) => flushed.push(done),
                }
                next = rx.try_recv().ok();
            }
            if !batch.is_empty() {
                let result = self.write(&batch);
                batch.clear();
                match (&result, self.failing) {
                    (Err(e), false) => {
                        self.failing = true;
                        tracing::warn!(path = %self.path.display(), error = %e, "cannot write the usage ledger; usage is still counted in memory");
                    }
                    (Ok(()), true) => {
                        self.failing = false;
                        tracing::info!(path = %self.path.display(), "the usage ledger is written again");
                    }
                    _ => {}
                }
            }
            for done in flushed.drain(..) {
                let _ = done.send(());
            }
            // Lines gather meanwhile: one write and one wake-up per interval, not per response
            // (a write per response cost the proxy a quarter of its CPU per POST).
            std::thread::sleep(BATCH_INTERVAL);
        }
    }

    /// Appends `lines` (whole lines), rotating first when they would take the file past its size.
    fn write(&mut self, lines: &[u8]) -> std::io::Result<()> {
        let size = match self.still_open() {
            Some(size) => size,
            None => self.open()?,
        };
        if size > 0 && size + lines.len() as u64 > self.max_size {
            self.file = None;
            std::fs::rename(&self.path, rotated(&self.path))?;
            self.open()?;
        }
        let file = self.file.as_mut().expect("opened above");
        if let Err(e) = file.write_all(lines) {
            self.file = None;
            return Err(e);
        }
        Ok(())
    }

    /// The open ledger's size, while the path still names it: once the file was deleted, moved
    /// away or replaced (logrotate), the next write opens the path again rather than append to a
    /// file no one will read.
    fn still_open(&mut self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        let open = self.file.as_ref()?.metadata().ok();
        let here = std::fs::symlink_metadata(&self.path).ok();
        match (open, here) {
            (Some(o), Some(h)) if (o.dev(), o.ino()) == (h.dev(), h.ino()) => Some(o.len()),
            _ => {
                self.file = None;
                None
            }
        }
    }

    /// Opens (creating) the ledger for appending; its size.
    fn open(&mut self) -> std::io::Result<u64> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        // Non-blocking: opening a FIFO planted here would wait for a reader (and the daemon's
        // exit with it).
        let file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(&self.path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(std::io::Error::other(format!(
                "{} is not a regular file; remove it",
                self.path.display()
            )));
        }
        crate::owner::check(&self.path, &meta)?;
        // A line cut short (a full disk, a crash) is ended, so the next one stays a line of its own.
        let mut last = [0u8];
        if meta.len() > 0 {
            use std::os::unix::fs::FileExt;
            file.read_exact_at(&mut last, meta.len() - 1)?;
        }
        let mut file = file;
        if meta.len() > 0 && last[0] != b'\n' {
            file.write_all(b"\n")?;
        }
        self.file = Some(file);
        Ok(meta.len())
    }
}

/// `FILE.1`.
pub fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".1");
    PathBuf::from(name)
}

/// The counts in a ledger (its rotated part first): what `behest-agent usage` shows when no
/// daemon runs. Lines that do not parse are skipped. `None` when there is no ledger at all.
pub fn read(path: &Path) -> std::io::Result<Option<Report>> {
    read_only(path, None, None)
}

/// [`read`], only the lines of `profile` and of `session` when they are given (a session is
/// picked before the counts' bound on sessions applies).
pub fn read_only(
    path: &Path,
    profile: Option<&str>,
    session: Option<&str>,
) -> std::io::Result<Option<Report>> {
    let mut report: Option<Report> = None;
    for part in [rotated(path), path.to_path_buf()] {
        // Non-blocking: opening a FIFO planted here would wait for a writer.
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&part)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let report = report.get_or_insert_with(Report::default);
        for text in std::io::BufReader::new(file).split(b'\n') {
            let Ok(line) = serde_json::from_slice::<Line>(&text?) else {
                continue;
            };
            if profile.is_some_and(|p| p != line.profile)
                || session.is_some_and(|s| s != line.session)
            {
                continue;
            }
            if report.since.is_empty() {
                report.since = line.ts.clone();
            }
            let tokens = line.total_tokens.map(|total| Tokens {
                prompt: line.prompt_tokens.unwrap_or(0),
                completion: line.completion_tokens.unwrap_or(0),
                total,
            });
            let model = line.model.as_deref().unwrap_or(NO_SESSION);
            report.add(&line.session, model, line.status, tokens);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: u64) -> Line {
        Line {
            ts: format!("2026-12-07T00:00:{n:02}Z"),
            session: "job".into(),
            profile: "default".into(),
            model: Some("m".into()),
            path: "/v1/chat/completions".into(),
            status: 200,
            prompt_tokens: Some(n),
            completion_tokens: Some(1),
            total_tokens: Some(n + 1),
            duration_ms: 3,
            request_id: format!("r{n}"),
        }
    }

    #[tokio::test]
    async fn lines_are_appended_0600_rotated_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/usage.jsonl");
        let one = serde_json::to_vec(&line(10)).unwrap().len() as u64 + 1;
        let ledger = Ledger::start(path.clone(), one * 3);
        // Two batches: the second would take the file past its size, so it starts a new one.
        for n in 10..15 {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_601_600 + n);
            ledger.append(at, line(n));
            if n == 12 {
                ledger.flush().await;
            }
        }
        ledger.flush().await;
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let current = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(rotated(&path)).unwrap();
        assert_eq!(old.lines().count(), 3);
        assert_eq!(current.lines().count(), 2);
        let report = read(&path).unwrap().unwrap();
        assert_eq!(report.since, "2026-12-07T00:00:10Z");
        assert_eq!(report.totals.requests, 5);
        assert_eq!(report.totals.total_tokens, (11..16).sum::<u64>());
    }

    #[tokio::test]
    async fn a_symlink_at_the_ledger_path_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "").unwrap();
        let path = dir.path().join("usage.jsonl");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let ledger = Ledger::start(path.clone(), 1 << 20);
        ledger.append(std::time::SystemTime::now(), line(1));
        ledger.flush().await;
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "");
    }

    #[tokio::test]
    async fn a_ledger_other_users_may_write_is_not_written() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.jsonl");
        // Planted by another user, writable (and readable) by all.
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let ledger = Ledger::start(path.clone(), 1 << 20);
        ledger.append(std::time::SystemTime::now(), line(1));
        ledger.flush().await;
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }

    /// A FIFO at the path is not written (its open waited for a reader, and the daemon's exit
    /// with it).
    #[tokio::test]
    async fn a_fifo_at_the_ledger_path_is_not_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.jsonl");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let ledger = Ledger::start(path.clone(), 1 << 20);
        ledger.append(std::time::SystemTime::now(), line(1));
        tokio::time::timeout(std::time::Duration::from_secs(30), ledger.flush())
            .await
            .expect("the writer is not stuck opening the FIFO");
    }

    /// A line cut short (a full disk, a crash) is ended before the next is written: the two ran
    /// together into one line no reader could parse.
    #[tokio::test]
    async fn a_line_cut_short_is_ended_before_the_next() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.jsonl");
        let whole = serde_json::to_string(&line(1)).unwrap();
        std::fs::write(&path, format!("{whole}\n{}", &whole[..20])).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let ledger = Ledger::start(path.clone(), 1 << 20);
        ledger.append(std::time::SystemTime::now(), line(2));
        ledger.flush().await;
        let report = read(&path).unwrap().unwrap();
        assert_eq!(report.totals.requests, 2, "both whole lines are read");
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
    }

    #[test]
    fn unparsable_lines_are_skipped_and_a_missing_ledger_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.jsonl");
        assert_eq!(read(&path).unwrap(), None);
        let mut text = serde_json::to_string(&line(1)).unwrap();
        text.push_str("\n{not json\n\"x\"\n");
        std::fs::write(&path, text).unwrap();
        assert_eq!(read(&path).unwrap().unwrap().totals.requests, 1);
    }

    #[tokio::test]
    async fn a_ledger_deleted_or_moved_away_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.jsonl");
        let ledger = Ledger::start(path.clone(), 1 << 20);
        let now = std::time::SystemTime::now();
        ledger.append(now, line(1));
        ledger.flush().await;
        std::fs::remove_file(&path).unwrap();
        ledger.append(now, line(2));
        ledger.flush().await;
        assert_eq!(read(&path).unwrap().unwrap().totals.total_tokens, 3);
        std::fs::rename(&path, dir.path().join("moved")).unwrap();
        ledger.append(now, line(3));
        ledger.flush().await;
        assert_eq!(read(&path).unwrap().unwrap().totals.total_tokens, 4);
    }

    #[test]
    fn a_session_is_read_whatever_the_number_of_sessions_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.jsonl");
        let mut text = String::new();
        for i in 0..=crate::usage::MAX_SESSIONS {
            let mut l = line(1);
            l.session = format!("s{i}");
            text.push_str(&serde_json::to_string(&l).unwrap());
            text.push('\n');
        }
        std::fs::write(&path, text).unwrap();
        let last = format!("s{}", crate::usage::MAX_SESSIONS);
        let all = read(&path).unwrap().unwrap();
        assert!(!all.sessions.contains_key(&last), "past the bound");
        let one = read_only(&path, None, Some(&last)).unwrap().unwrap();
        assert_eq!(one.only(&last).totals.requests, 1);
    }
}
