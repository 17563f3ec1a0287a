//! Running under systemd: `sd_notify` (`READY=1` once a valid token is held and the listeners are
//! bound, `STATUS=` lines that say what the agent is doing, `WATCHDOG=1` at half the unit's
//! `WatchdogSec`, `RELOADING=1` and `STOPPING=1`). Every call is a no-op outside systemd
//! (`NOTIFY_SOCKET` unset). Status lines never carry a secret.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::token::TokenSource;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Whether `READY=1` was sent: a reload before it (while the first token is awaited) must not send
/// one.
static READY_SENT: AtomicBool = AtomicBool::new(false);

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
    READY_SENT.store(true, Ordering::Relaxed);
}

/// A reload is done: `READY=1` again if the agent was ready before it, else only `STATUS=`.
pub fn reloaded(status: &str) {
    if READY_SENT.load(Ordering::Relaxed) {
        ready(status);
    } else {
        self::status(status);
    }
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn reloading() {
    if !READY_SENT.load(Ordering::Relaxed) {
        return;
    }
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// A human status line for `STATUS=`.
pub fn describe(tokens: &TokenSource) -> String {
    let s = tokens.status();
    let retry = s
        .next_refresh
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .and_then(|t| t.duration_since(tokens.clock().now()).ok())
        .map(human)
        .unwrap_or_else(|| "soon".into());
    let valid_for = s
        .expires_in
        .filter(|e| *e > 0)
        .map(|e| human(Duration::from_secs(e as u64)));
    match (&s.last_error, valid_for) {
        (None, Some(v)) => format!(
            "token valid for {v} (uid {})",
            s.claims
                .as_ref()
                .and_then(|c| c.uid.as_deref())
                .unwrap_or("-")
        ),
        (Some(_), Some(v)) => format!(
            "IdP failing ({}), retrying in {retry}; cached token valid for {v}",
            s.last_error_code.as_deref().unwrap_or("error")
        ),
        (Some(_), None) => format!(
            "no valid token: IdP failing ({}), retrying in {retry}",
            s.last_error_code.as_deref().unwrap_or("error")
        ),
        (None, None) => "getting a token".to_string(),
    }
}

fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 3600 {
        format!("{}h", secs / 3600)
    } else if secs >= 60 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// Sends `READY=1` once `tokens` holds a valid token (the listeners are already bound when this
/// is called), then keeps `STATUS=` current until `shutdown`.
pub async fn report(tokens: TokenSource, shutdown: CancellationToken) {
    let mut changes = tokens.subscribe();
    let mut announced_ready = false;
    let mut last = String::new();
    loop {
        let line = describe(&tokens);
        if !announced_ready && tokens.is_ready() {
            ready(&line);
            announced_ready = true;
            last = line;
        } else if line != last {
            status(&line);
            last = line;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = changes.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}

/// Pings the watchdog at half the unit's `WatchdogSec`, from a task on the same runtime as the
/// proxy: a wedged runtime stops the pings and systemd restarts the agent.
pub async fn watchdog(shutdown: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = (interval / 2).max(Duration::from_millis(100));
    loop {
        send(&[NotifyState::Watchdog]);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}
