//! Wall-clock time, injected. The token engine and the cache read the time through [`Clock`] so
//! tests can pause tokio's timer and jump the wall clock (a machine waking from suspend) without
//! sleeping. Never reads the time any other way. (The devkit servers have their own `devkit::Now`;
//! a test hands them a closure over the same clock.)

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    fn now(&self) -> SystemTime;

    /// Seconds since the Unix epoch (what JWT `exp`/`iat` use).
    fn unix(&self) -> u64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    }
}

pub type SharedClock = Arc<dyn Clock>;

/// `secs` after the Unix epoch, or `None` when that is past what the platform's time can hold (a
/// hostile `exp` or `x-ratelimit-reset` must be refused, not overflow).
pub fn from_unix(secs: u64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// The real wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

/// A test clock that follows tokio's (pausable) timer from a fixed start, plus an offset that can be
/// jumped forward to simulate suspend: `now = start + (tokio::Instant::now() - t0) + offset`.
#[derive(Debug)]
pub struct TestClock {
    start: SystemTime,
    t0: tokio::time::Instant,
    offset_ms: AtomicI64,
}

impl TestClock {
    /// Starts at the real current time; must be called inside a tokio runtime.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: SystemTime::now(),
            t0: tokio::time::Instant::now(),
            offset_ms: AtomicI64::new(0),
        })
    }

    /// Moves the wall clock forward without moving tokio's timer (the machine slept).
    pub fn jump(&self, by: Duration) {
        self.offset_ms
            .fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now(&self) -> SystemTime {
        let offset = self.offset_ms.load(Ordering::SeqCst);
        let base = self.start + (tokio::time::Instant::now() - self.t0);
        if offset >= 0 {
            base + Duration::from_millis(offset as u64)
        } else {
            base - Duration::from_millis(offset.unsigned_abs())
        }
    }
}
