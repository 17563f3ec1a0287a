//! Usage accounting and budgets (SPEC §8): what each session (CI job) spent, read from the
//! responses as they pass ([`read`]), counted per session and model, appended to the JSON Lines
//! ledger ([`ledger`]), and checked against the budgets before a request goes upstream.
//!
//! The counts live in memory for the daemon's lifetime (a reload keeps them). Sessions are many
//! and chosen by clients, so their number is bounded: the daemon keeps the [`MAX_SESSIONS`] most
//! recently active ones, and folds the counts of those it lets go into [`OTHER`] (a runner's
//! daemon sees a new session per job, for months); past [`MAX_MODELS`] models a session counts
//! the rest under [`OTHER`]. Budgets are checked once, when a request arrives: what is in flight
//! finishes.

pub mod ledger;
pub mod read;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::SharedClock;
use crate::config::{BudgetSettings, UsageSettings};
use crate::telemetry::metrics::{Metrics, ModelCounters};

pub use read::{Meter, Read, Tokens};

/// Sessions counted one by one: the daemon keeps the most recently active ones, a ledger's reader
/// the first ones; the rest are counted under [`OTHER`].
pub const MAX_SESSIONS: usize = 10_000;
/// Models counted one by one (per session, and in the metrics); later ones under [`OTHER`].
pub const MAX_MODELS: usize = 64;
/// Where what is past a bound is counted.
pub const OTHER: &str = "(other)";
/// The session of a request that names none.
pub const NO_SESSION: &str = "-";

/// The endpoints whose `POST`s are accounted (and subject to budgets), as path suffixes under the
/// upstream's base path.
const ACCOUNTED: [&str; 4] = [
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/responses",
];

/// Whether a request is accounted: a `POST` to one of the [`ACCOUNTED`] endpoints.
pub fn accounted(method: &http::Method, path: &str) -> bool {
    method == http::Method::POST && endpoint(path).is_some()
}

/// The [`ACCOUNTED`] endpoint `path` names, read as a lenient upstream might route it
/// (percent-decoded, without `;` parameters or a trailing `/`), so that
/// `/v1/chat/%63ompletions/` spends from the budget too.
pub fn endpoint(path: &str) -> Option<&'static str> {
    let find = |p: &str| ACCOUNTED.into_iter().find(|e| p.ends_with(e));
    if !path.contains(['%', ';']) && !path.ends_with('/') {
        return find(path);
    }
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let plain: Vec<&str> = decoded
        .split('/')
        .map(|segment| segment.split(';').next().unwrap_or_default())
        .collect();
    find(plain.join("/").trim_end_matches('/'))
}

/// The six counts SPEC §8 names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// 4xx and 5xx responses.
    pub errors: u64,
    /// 2xx responses without a readable usage.
    pub unaccounted: u64,
}

impl Counts {
    fn merge(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
        self.total_tokens = self.total_tokens.saturating_add(other.total_tokens);
        self.errors += other.errors;
        self.unaccounted += other.unaccounted;
    }

    fn add(&mut self, status: u16, tokens: Option<Tokens>) {
        self.requests += 1;
        match tokens {
            // Saturating: an upstream may claim any count up to u64::MAX.
            Some(t) => {
                self.prompt_tokens = self.prompt_tokens.saturating_add(t.prompt);
                self.completion_tokens = self.completion_tokens.saturating_add(t.completion);
                self.total_tokens = self.total_tokens.saturating_add(t.total);
            }
            None if status >= 400 => {}
            None if (200..300).contains(&status) => self.unaccounted += 1,
            None => {}
        }
        if status >= 400 {
            self.errors += 1;
        }
    }
}

/// A session's counts, and per model.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionCounts {
    #[serde(flatten)]
    pub counts: Counts,
    pub models: BTreeMap<String, Counts>,
}

/// `behest-agent usage --json`: since when, the totals, and each session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub since: String,
    pub totals: Counts,
    pub sessions: BTreeMap<String, SessionCounts>,
}

impl Report {
    /// Counts one response; a session past [`MAX_SESSIONS`] under [`OTHER`] (the ledger's reader).
    pub fn add(&mut self, session: &str, model: &str, status: u16, tokens: Option<Tokens>) {
        let session = if self.sessions.contains_key(session) || self.sessions.len() < MAX_SESSIONS {
            session
        } else {
            OTHER
        };
        self.count(session, model, status, tokens);
    }

    /// Counts one response under `session`, whose number the caller bounds.
    fn count(&mut self, session: &str, model: &str, status: u16, tokens: Option<Tokens>) {
        self.totals.add(status, tokens);
        let s = match self.sessions.get_mut(session) {
            Some(s) => s,
            None => self.sessions.entry(session.to_string()).or_default(),
        };
        s.counts.add(status, tokens);
        bounded_entry(&mut s.models, model, MAX_MODELS).add(status, tokens);
    }

    /// Moves `session`'s counts into [`OTHER`]'s (the totals do not change).
    fn fold(&mut self, session: &str) {
        let Some(gone) = self.sessions.remove(session) else {
            return;
        };
        let other = self.sessions.entry(OTHER.to_string()).or_default();
        other.counts.merge(&gone.counts);
        for (model, c) in &gone.models {
            bounded_entry(&mut other.models, model, MAX_MODELS).merge(c);
        }
    }

    /// Only this session (an unknown one: zero counts).
    pub fn only(mut self, session: &str) -> Report {
        let one = self.sessions.remove(session).unwrap_or_default();
        Report {
            since: self.since,
            totals: one.counts,
            sessions: BTreeMap::from([(session.to_string(), one)]),
        }
    }

    /// A Markdown table: one row per session and model, and the total.
    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| session | model | requests | prompt tokens | completion tokens | total tokens | errors | unaccounted |\n|---|---|--:|--:|--:|--:|--:|--:|\n",
        );
        let row = |out: &mut String, session: &str, model: &str, c: &Counts| {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                session,
                model,
                c.requests,
                c.prompt_tokens,
                c.completion_tokens,
                c.total_tokens,
                c.errors,
                c.unaccounted
            ));
        };
        for (session, s) in &self.sessions {
            for (model, c) in &s.models {
                row(&mut out, &cell(session), &cell(model), c);
            }
        }
        row(&mut out, "**total**", "", &self.totals);
        out
    }

    /// One line: `requests, tokens (prompt + completion)`.
    pub fn line(&self) -> String {
        let t = &self.totals;
        format!(
            "{} requests, {} tokens ({} prompt + {} completion), {} errors, {} unaccounted",
            t.requests,
            t.total_tokens,
            t.prompt_tokens,
            t.completion_tokens,
            t.errors,
            t.unaccounted
        )
    }
}

/// `map[key]`, made when missing while the map holds fewer than `max` keys, else `map[OTHER]`.
/// (Looked up first: a key seen before costs no allocation.)
fn bounded_entry<'a, V: Default>(
    map: &'a mut BTreeMap<String, V>,
    key: &str,
    max: usize,
) -> &'a mut V {
    let key = if map.contains_key(key) || map.len() < max {
        key
    } else {
        OTHER
    };
    if !map.contains_key(key) {
        map.insert(key.to_string(), V::default());
    }
    map.get_mut(key).expect("inserted above")
}

/// A Markdown table cell that shows a session or model name as text: no `|`, line break, HTML,
/// link or emphasis from it.
fn cell(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\\' | '`' | '*' | '_' | '[' | ']' | '(' | ')' | '!' | '~' | '#' => {
                out.push('\\');
                out.push(c);
            }
            '|' => out.push(' '),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Why a request is refused for budget: a 429 `budget_exceeded`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The budget's key: `budget.session_tokens`, `budget.session_requests`, `budget.hourly_tokens`.
    pub key: &'static str,
    pub spent: u64,
    pub limit: u64,
    /// For the hourly budget: when enough of the hour's tokens have rolled off.
    pub retry_after: Option<Duration>,
}

impl Refusal {
    /// The `budget` label of `behest_agent_budget_refusals_total`.
    pub fn budget(&self) -> &'static str {
        self.key.trim_start_matches("budget.")
    }

    pub fn message(&self, session: &str) -> String {
        let scope = match self.key {
            "budget.hourly_tokens" => "the agent's hourly token budget".to_string(),
            "budget.session_requests" => format!("the request budget of session `{session}`"),
            _ => format!("the token budget of session `{session}`"),
        };
        let unit = if self.key == "budget.session_requests" {
            "requests"
        } else {
            "tokens"
        };
        format!(
            "{scope} is spent: {}/{} {unit}; raise {} in the agent's configuration (0 = no limit){}",
            self.spent,
            self.limit,
            self.key,
            match self.retry_after {
                Some(d) => format!(", or retry in {}s", d.as_secs()),
                None => String::new(),
            }
        )
    }
}

/// Tokens per minute over the last hour.
#[derive(Debug, Default)]
struct Hourly {
    /// (minute since the epoch, tokens), oldest first, at most 60.
    minutes: std::collections::VecDeque<(u64, u64)>,
}

impl Hourly {
    fn expire(&mut self, minute: u64) {
        while self.minutes.front().is_some_and(|(m, _)| *m + 60 <= minute) {
            self.minutes.pop_front();
        }
    }

    fn add(&mut self, minute: u64, tokens: u64) {
        self.expire(minute);
        match self.minutes.back_mut() {
            Some((m, t)) if *m == minute => *t = t.saturating_add(tokens),
            _ => self.minutes.push_back((minute, tokens)),
        }
    }

    fn sum(&self) -> u64 {
        self.minutes
            .iter()
            .fold(0, |sum, (_, t)| sum.saturating_add(*t))
    }

    /// How long until the sum falls under `limit`, from `now` (seconds since the epoch).
    fn until_under(&self, limit: u64, now: u64) -> Duration {
        let mut sum = self.sum();
        for (m, t) in &self.minutes {
            sum = sum.saturating_sub(*t);
            if sum < limit {
                return Duration::from_secs(((m + 60) * 60).saturating_sub(now).max(1));
            }
        }
        Duration::from_secs(60)
    }
}

struct State {
    report: Report,
    /// The sessions counted one by one (at most [`MAX_SESSIONS`]), each with its requests let
    /// through, counted as they are admitted (not as they end) so that `session_requests` is
    /// exact however many run at once. The keys of `report.sessions`, but for [`OTHER`].
    admitted: HashMap<String, Admitted>,
    /// Requests and responses counted so far: the clock of [`Admitted::last`].
    ticks: u64,
    /// The same counts per profile (its names come from the configuration: bounded).
    profiles: BTreeMap<String, Report>,
    hourly: Hourly,
}

#[derive(Default)]
struct Admitted {
    requests: u64,
    /// When this session was last active ([`State::ticks`]): the least recent go first.
    last: u64,
}

impl State {
    /// `session`, marked active now; a new one past [`MAX_SESSIONS`] first makes room.
    fn touch(&mut self, session: &str) -> &mut Admitted {
        self.ticks += 1;
        let last = self.ticks;
        if !self.admitted.contains_key(session) {
            if self.admitted.len() >= MAX_SESSIONS {
                self.let_go();
            }
            self.admitted
                .insert(session.to_string(), Admitted::default());
        }
        let a = self.admitted.get_mut(session).expect("inserted above");
        a.last = last;
        a
    }

    /// Lets the tenth of the sessions least recently admitted go, their counts folded into
    /// [`OTHER`]: a tenth at once, so that a stream of new sessions sorts rarely.
    fn let_go(&mut self) {
        let mut lasts: Vec<u64> = self.admitted.values().map(|a| a.last).collect();
        let n = (lasts.len() / 10).max(1);
        let cut = *lasts.select_nth_unstable(n - 1).1;
        let gone: Vec<String> = self
            .admitted
            .iter()
            .filter(|(_, a)| a.last <= cut)
            .map(|(s, _)| s.clone())
            .collect();
        for session in gone {
            self.admitted.remove(&session);
            self.report.fold(&session);
            for report in self.profiles.values_mut() {
                report.fold(&session);
            }
        }
    }
}

/// The daemon's accounting: counts, budgets, the ledger. Shared by every forwarder.
pub struct Accounting {
    state: Mutex<State>,
    budgets: Mutex<BudgetSettings>,
    stream_include_usage: std::sync::atomic::AtomicBool,
    ledger: Option<ledger::Ledger>,
    clock: SharedClock,
    metrics: OnceLock<Arc<Metrics>>,
    /// Each model's metric counters, fetched from their families once (bounded like the counts).
    counters: Mutex<BTreeMap<String, ModelCounters>>,
}

/// One accounted response, as the proxy saw it.
#[derive(Debug)]
pub struct Entry {
    pub session: String,
    /// The profile whose token the request carried (`default` for `[auth]`).
    pub profile: std::sync::Arc<str>,
    pub model: Option<String>,
    pub path: String,
    pub status: u16,
    pub tokens: Option<Tokens>,
    pub duration: Duration,
    pub request_id: String,
}

impl Accounting {
    /// Starts the ledger writer (when a ledger file is configured).
    pub fn new(usage: &UsageSettings, budgets: BudgetSettings, clock: SharedClock) -> Accounting {
        Accounting {
            state: Mutex::new(State {
                report: Report {
                    since: crate::token::rfc3339(clock.now()),
                    ..Report::default()
                },
                admitted: HashMap::new(),
                ticks: 0,
                profiles: BTreeMap::new(),
                hourly: Hourly::default(),
            }),
            budgets: Mutex::new(budgets),
            stream_include_usage: usage.stream_include_usage.into(),
            ledger: usage
                .ledger_file
                .as_ref()
                .map(|path| ledger::Ledger::start(path.clone(), usage.ledger_max_size)),
            clock,
            metrics: OnceLock::new(),
            counters: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn attach_metrics(&self, metrics: Arc<Metrics>) {
        let _ = self.metrics.set(metrics);
    }

    /// New budgets and `stream_include_usage` (a reload); the counts stay. (A new ledger file
    /// takes a restart.)
    pub fn configure(&self, usage: &UsageSettings, budgets: BudgetSettings) {
        *self.budgets.lock().expect("budgets lock") = budgets;
        self.stream_include_usage.store(
            usage.stream_include_usage,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// `usage.stream_include_usage`.
    pub fn stream_include_usage(&self) -> bool {
        self.stream_include_usage
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a new accounted request of `session` may go upstream (it is then counted against
    /// `session_requests` at once).
    pub fn admit(&self, session: &str) -> Result<(), Refusal> {
        let b = self.budgets.lock().expect("budgets lock").clone();
        let mut state = self.state.lock().expect("usage lock");
        let admitted = state.admitted.get(session).map_or(0, |a| a.requests);
        let tokens = state
            .report
            .sessions
            .get(session)
            .map_or(0, |s| s.counts.total_tokens);
        let refusal = if let Some(limit) = b.session_requests.filter(|l| admitted >= *l) {
            Some(Refusal {
                key: "budget.session_requests",
                spent: admitted,
                limit,
                retry_after: None,
            })
        } else if let Some(limit) = b.session_tokens.filter(|l| tokens >= *l) {
            Some(Refusal {
                key: "budget.session_tokens",
                spent: tokens,
                limit,
                retry_after: None,
            })
        } else if let Some(limit) = b.hourly_tokens {
            let now = self.clock.unix();
            state.hourly.expire(now / 60);
            let hour = state.hourly.sum();
            (hour >= limit).then(|| Refusal {
                key: "budget.hourly_tokens",
                spent: hour,
                limit,
                retry_after: Some(state.hourly.until_under(limit, now)),
            })
        } else {
            None
        };
        if refusal.is_none() {
            state.touch(session).requests += 1;
        }
        drop(state);
        match refusal {
            None => Ok(()),
            Some(r) => {
                if let Some(m) = self.metrics.get() {
                    m.budget_refusal(r.budget());
                }
                Err(r)
            }
        }
    }

    /// Counts one response and appends its ledger line.
    pub fn record(&self, entry: Entry) {
        let model = entry.model.as_deref().unwrap_or(NO_SESSION);
        {
            let mut state = self.state.lock().expect("usage lock");
            let session = entry.session.as_str();
            state.touch(session);
            state
                .report
                .count(session, model, entry.status, entry.tokens);
            let since = state.report.since.clone();
            state
                .profiles
                .entry(entry.profile.to_string())
                .or_insert_with(|| Report {
                    since,
                    ..Report::default()
                })
                .count(session, model, entry.status, entry.tokens);
            if let Some(t) = entry.tokens {
                state.hourly.add(self.clock.unix() / 60, t.total);
            }
        }
        if let Some(m) = self.metrics.get() {
            let mut counters = self.counters.lock().expect("counters lock");
            let c = match counters.get(model) {
                Some(c) => c,
                None => {
                    let label = if counters.len() < MAX_MODELS {
                        model
                    } else {
                        OTHER
                    };
                    counters
                        .entry(label.to_string())
                        .or_insert_with(|| m.usage_counters(label))
                }
            };
            c.requests.inc();
            if let Some(t) = entry.tokens {
                // Saturating as the counts are (a counter that wrapped would read as a reset);
                // only this lock's holder adds to them.
                for (counter, n) in [(&c.prompt, t.prompt), (&c.completion, t.completion)] {
                    counter.inc_by(n.min(u64::MAX - counter.get()));
                }
            }
        }
        if let Some(ledger) = &self.ledger {
            ledger.append(
                self.clock.now(),
                ledger::Line {
                    ts: String::new(),
                    session: entry.session,
                    profile: entry.profile.to_string(),
                    model: entry.model,
                    path: entry.path,
                    status: entry.status,
                    prompt_tokens: entry.tokens.map(|t| t.prompt),
                    completion_tokens: entry.tokens.map(|t| t.completion),
                    total_tokens: entry.tokens.map(|t| t.total),
                    duration_ms: entry.duration.as_millis() as u64,
                    request_id: entry.request_id,
                },
            );
        }
    }

    /// The counts since the daemon started.
    pub fn report(&self) -> Report {
        self.state.lock().expect("usage lock").report.clone()
    }

    /// The counts of the requests that went with `profile`, since the daemon started.
    pub fn profile_report(&self, profile: &str) -> Report {
        let state = self.state.lock().expect("usage lock");
        state
            .profiles
            .get(profile)
            .cloned()
            .unwrap_or_else(|| Report {
                since: state.report.since.clone(),
                ..Report::default()
            })
    }

    /// [`Report::only`] of [`Accounting::report`] (or of `profile`'s), cloning only that session:
    /// a job's summary holds the lock for one session, not for a copy of ten thousand.
    pub fn session_report(&self, profile: Option<&str>, session: &str) -> Report {
        let state = self.state.lock().expect("usage lock");
        let report = match profile {
            Some(p) => state.profiles.get(p),
            None => Some(&state.report),
        };
        let one = report
            .and_then(|r| r.sessions.get(session))
            .cloned()
            .unwrap_or_default();
        Report {
            since: state.report.since.clone(),
            totals: one.counts,
            sessions: BTreeMap::from([(session.to_string(), one)]),
        }
    }

    /// Waits until the ledger has written what was recorded so far (at shutdown, and in tests).
    pub async fn flush(&self) {
        if let Some(l) = &self.ledger {
            l.flush().await;
        }
    }
}

impl std::fmt::Debug for Accounting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounting").finish_non_exhaustive()
    }
}

/// A session's name in the counts and the ledger: the request's `X-Session-Id`, else `-`.
pub fn session_of(headers: &http::HeaderMap) -> String {
    headers
        .get(crate::proxy::X_SESSION_ID)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_else(|| NO_SESSION.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TestClock;

    fn tokens(total: u64) -> Option<Tokens> {
        Some(Tokens {
            prompt: total / 2,
            completion: total - total / 2,
            total,
        })
    }

    fn accounting(b: BudgetSettings) -> (Accounting, Arc<TestClock>) {
        let clock = TestClock::new();
        let usage = UsageSettings {
            ledger_file: None,
            ledger_max_size: 1 << 20,
            stream_include_usage: false,
        };
        (Accounting::new(&usage, b, clock.clone()), clock)
    }

    fn entry(session: &str, status: u16, t: Option<Tokens>) -> Entry {
        Entry {
            session: session.into(),
            profile: "default".into(),
            model: Some("m".into()),
            path: "/v1/chat/completions".into(),
            status,
            tokens: t,
            duration: Duration::from_millis(5),
            request_id: "r".into(),
        }
    }

    #[test]
    fn counts_per_session_and_model_with_errors_and_unaccounted_apart() {
        let (a, _) = accounting(BudgetSettings::default());
        a.record(entry("job-1", 200, tokens(10)));
        a.record(entry("job-1", 200, None));
        a.record(entry("job-1", 429, None));
        a.record(entry("-", 200, tokens(4)));
        let r = a.report();
        let want = Counts {
            requests: 3,
            prompt_tokens: 5,
            completion_tokens: 5,
            total_tokens: 10,
            errors: 1,
            unaccounted: 1,
        };
        assert_eq!(r.sessions["job-1"].counts, want);
        assert_eq!(r.sessions["job-1"].models["m"], want);
        assert_eq!(r.totals.requests, 4);
        assert_eq!(r.totals.total_tokens, 14);
        assert_eq!(r.clone().only("job-1").totals, want);
        assert_eq!(r.only("nope").totals, Counts::default());
        // The same from the daemon's one-session answer, of all requests or of a profile's.
        assert_eq!(a.session_report(None, "job-1").totals, want);
        assert_eq!(a.session_report(Some("default"), "job-1").totals, want);
        assert_eq!(
            a.session_report(Some("team-b"), "job-1").totals,
            Counts::default()
        );
        assert_eq!(a.session_report(None, "nope").sessions.len(), 1);
    }

    #[test]
    fn session_budgets_refuse_new_requests_once_spent() {
        let (a, _) = accounting(BudgetSettings {
            session_tokens: Some(15),
            session_requests: Some(3),
            hourly_tokens: None,
        });
        a.record(entry("a", 200, tokens(10)));
        assert_eq!(a.admit("a"), Ok(()));
        a.record(entry("a", 200, tokens(10)));
        let r = a.admit("a").unwrap_err();
        assert_eq!((r.key, r.spent, r.limit), ("budget.session_tokens", 20, 15));
        assert!(
            r.message("a").contains("20/15 tokens")
                && r.message("a").contains("budget.session_tokens")
        );
        // Requests count as they are let through, before any has ended.
        for _ in 0..3 {
            assert_eq!(a.admit("b"), Ok(()), "another session has its own budget");
        }
        let r = a.admit("b").unwrap_err();
        assert_eq!((r.key, r.spent, r.limit), ("budget.session_requests", 3, 3));
        assert_eq!(
            a.admit("b").unwrap_err().spent,
            3,
            "a refusal is not counted"
        );
    }

    #[test]
    fn the_hourly_budget_rolls_off_with_a_retry_after() {
        let (a, clock) = accounting(BudgetSettings {
            hourly_tokens: Some(100),
            ..BudgetSettings::default()
        });
        a.record(entry("a", 200, tokens(60)));
        clock.jump(Duration::from_secs(30 * 60));
        a.record(entry("b", 200, tokens(50)));
        let r = a.admit("c").unwrap_err();
        assert_eq!(r.key, "budget.hourly_tokens");
        let wait = r.retry_after.unwrap();
        assert!(
            wait <= Duration::from_secs(30 * 60) && wait > Duration::from_secs(28 * 60),
            "{wait:?}"
        );
        clock.jump(wait);
        assert_eq!(a.admit("c"), Ok(()), "the first 60 rolled off");
    }

    #[test]
    fn sessions_and_models_past_their_bounds_are_counted_as_other() {
        let mut r = Report::default();
        for i in 0..MAX_SESSIONS + 5 {
            r.add(&format!("s{i}"), "m", 200, tokens(1));
        }
        assert_eq!(r.sessions.len(), MAX_SESSIONS + 1);
        assert_eq!(r.sessions[OTHER].counts.requests, 5);
        assert_eq!(r.totals.requests, (MAX_SESSIONS + 5) as u64);
    }

    #[test]
    fn the_daemon_keeps_the_sessions_most_recently_active_and_folds_the_rest_into_other() {
        let (a, _) = accounting(BudgetSettings {
            session_requests: Some(2),
            ..BudgetSettings::default()
        });
        a.admit("early").unwrap();
        a.record(entry("early", 200, tokens(7)));
        for i in 0..MAX_SESSIONS + 50 {
            let s = format!("s{i}");
            a.admit(&s).unwrap();
            a.record(entry(&s, 200, tokens(1)));
            if i == MAX_SESSIONS / 2 {
                // Active again: it stays.
                a.admit("early").unwrap();
            }
        }
        // A new session, past the bound, still has its budget and its own counts.
        a.admit("new").unwrap();
        a.record(entry("new", 200, tokens(3)));
        a.admit("new").unwrap();
        assert_eq!(a.admit("new").unwrap_err().key, "budget.session_requests");
        let r = a.report();
        assert!(r.sessions.len() <= MAX_SESSIONS + 1, "{}", r.sessions.len());
        assert_eq!(r.sessions["new"].counts.total_tokens, 3);
        assert_eq!(r.sessions["early"].counts.total_tokens, 7);
        assert!(!r.sessions.contains_key("s0"), "the least recent went");
        assert!(r.sessions.contains_key(&format!("s{}", MAX_SESSIONS + 49)));
        // Nothing is lost: what went is under OTHER, and the sessions add up to the totals.
        assert!(r.sessions[OTHER].counts.requests > 0);
        let sum: u64 = r.sessions.values().map(|s| s.counts.requests).sum();
        assert_eq!(sum, r.totals.requests);
        assert_eq!(r.totals.requests, (MAX_SESSIONS + 52) as u64);
        let p = a.profile_report("default");
        let sum: u64 = p.sessions.values().map(|s| s.counts.total_tokens).sum();
        assert_eq!(sum, p.totals.total_tokens);
        assert!(!p.sessions.contains_key("s0"));
    }

    #[test]
    fn counts_saturate_rather_than_wrap() {
        let (a, _) = accounting(BudgetSettings::default());
        let huge = Tokens {
            prompt: u64::MAX,
            completion: u64::MAX,
            total: u64::MAX,
        };
        let metrics = Arc::new(Metrics::new());
        a.attach_metrics(metrics.clone());
        a.record(entry("a", 200, Some(huge)));
        a.record(entry("a", 200, tokens(10)));
        assert_eq!(a.report().totals.total_tokens, u64::MAX);
        assert_eq!(a.report().sessions["a"].counts.prompt_tokens, u64::MAX);
        let text = metrics.encode();
        for kind in ["prompt", "completion"] {
            let line = format!(
                "usage_tokens_total{{model=\"m\",kind=\"{kind}\"}} {}",
                u64::MAX
            );
            assert!(text.contains(&line), "no {line:?} in:\n{text}");
        }
        let (a, _) = accounting(BudgetSettings {
            hourly_tokens: Some(100),
            ..BudgetSettings::default()
        });
        a.record(entry("a", 200, Some(huge)));
        a.record(entry("a", 200, tokens(10)));
        assert_eq!(
            a.admit("a").unwrap_err().spent,
            u64::MAX,
            "the hour's sum too"
        );
    }

    #[test]
    fn the_markdown_table_has_a_row_per_model_and_a_total() {
        let mut r = Report::default();
        r.add("job|1", "gpt", 200, tokens(10));
        let md = r.markdown();
        assert!(
            md.contains("| job 1 | gpt | 1 | 5 | 5 | 10 | 0 | 0 |"),
            "{md}"
        );
        assert!(md.contains("| **total** |  | 1 |"), "{md}");
        r.add("x", "<img src=x>", 200, tokens(1));
        r.add("y", "[l](http://e) *b* &amp;", 200, tokens(1));
        let md = r.markdown();
        assert!(md.contains("| x | &lt;img src=x&gt; | 1 |"), "{md}");
        assert!(
            md.contains(r"| y | \[l\]\(http://e\) \*b\* &amp;amp; | 1 |"),
            "{md}"
        );
    }

    #[test]
    fn accounted_endpoints() {
        use http::Method;
        for p in [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/responses",
        ] {
            assert!(accounted(&Method::POST, p), "{p}");
        }
        assert!(!accounted(&Method::GET, "/v1/chat/completions"));
        assert!(!accounted(&Method::POST, "/v1/files"));
        // The same endpoints as a lenient upstream would route them.
        for p in [
            "/v1/chat/completions/",
            "/v1/chat/%63ompletions",
            "/v1/chat/completions;x",
            "/v1/chat;a=b/completions//",
            "/v1/%65mbeddings",
        ] {
            assert!(accounted(&Method::POST, p), "{p}");
        }
        assert!(!accounted(&Method::POST, "/v1/chat/completions/x/messages"));
    }
}

/// The `model` of a JSON request body, found without parsing it all (a request's model names a
/// response that does not); `None` when it cannot be found cheaply.
pub fn request_model(body: &[u8]) -> Option<String> {
    let at = memchr::memmem::find(body, b"\"model\"")?;
    let rest = &body[at + 7..];
    let rest = rest
        .trim_ascii_start()
        .strip_prefix(b":")?
        .trim_ascii_start();
    let rest = rest.strip_prefix(b"\"")?;
    let end = memchr::memchr2(b'"', b'\\', rest)?;
    (rest[end] == b'"')
        .then(|| std::str::from_utf8(&rest[..end]).ok().map(read::model_name))
        .flatten()
}

/// A streamed chat completion request without `stream_options.include_usage`, made to ask for
/// it (`usage.stream_include_usage`); `None` when the body is left as it is. Every other value
/// goes on as the client wrote it (a number is never reparsed; the keys come out sorted).
pub fn with_include_usage(body: &[u8]) -> Option<bytes::Bytes> {
    type Object = BTreeMap<String, Box<serde_json::value::RawValue>>;
    let raw = |text: &str| serde_json::value::RawValue::from_string(text.to_string()).ok();
    let mut request: Object = serde_json::from_slice(body).ok()?;
    if request.get("stream")?.get() != "true" {
        return None;
    }
    let mut options: Object = match request.get("stream_options") {
        None => Object::new(),
        Some(v) if v.get() == "null" => Object::new(),
        Some(v) => serde_json::from_str(v.get()).ok()?,
    };
    if options.get("include_usage").map(|v| v.get()) == Some("true") {
        return None;
    }
    options.insert("include_usage".into(), raw("true")?);
    request.insert(
        "stream_options".into(),
        raw(&serde_json::to_string(&options).ok()?)?,
    );
    serde_json::to_vec(&request).ok().map(bytes::Bytes::from)
}

#[cfg(test)]
mod request_tests {
    use super::*;

    #[test]
    fn the_request_model_is_found_or_not_guessed() {
        assert_eq!(
            request_model(br#"{"messages":[],"model" : "gpt-4o","stream":true}"#).as_deref(),
            Some("gpt-4o")
        );
        assert_eq!(request_model(br#"{"model":"a\"b"}"#), None);
        assert_eq!(request_model(br#"{"model":5}"#), None);
        assert_eq!(request_model(b"no model"), None);
    }

    #[test]
    fn include_usage_is_added_to_streamed_requests_only() {
        let added = with_include_usage(br#"{"model":"m", "stream" : true }"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&added).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");
        assert!(with_include_usage(br#"{"model":"m"}"#).is_none());
        assert!(
            with_include_usage(br#"{"stream":true,"stream_options":{"include_usage":true}}"#)
                .is_none()
        );
        let kept = with_include_usage(
            br#"{"stream":true,"stream_options":{"include_usage":false,"x":1}}"#,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&kept).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );
        assert!(with_include_usage(b"not json").is_none());
        assert!(with_include_usage(br#"{"stream":true,"stream_options":5}"#).is_none());
        // `null` is no options; numbers go on as written, never through a float.
        let exact = with_include_usage(
            br#"{"stream":true,"stream_options":null,"seed":123456789012345678901234,"f":1.0e2}"#,
        )
        .unwrap();
        assert_eq!(
            std::str::from_utf8(&exact).unwrap(),
            r#"{"f":1.0e2,"seed":123456789012345678901234,"stream":true,"stream_options":{"include_usage":true}}"#
        );
    }
}
