//! The daemon assembled: the token engine and its refresher, the control API, the proxy, metrics and
//! systemd notifications, started from settings and stopped by a cancellation token. `run`, `dev`,
//! `exec` (without a daemon) and the tests all start it here. A reload builds what changed from new
//! settings and swaps it in; a broken new configuration never reaches this module (it is refused
//! where it is loaded, and the old one keeps running).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::SharedClock;
use crate::config::{DEFAULT_PROFILE, ListenAddr, Settings};
use crate::control::{self, ControlState};
use crate::keys::KeyStore;
use crate::proxy::{Proxy, ProxyProfile};
use crate::server::Listener;
use crate::service;
use crate::telemetry::LogHandle;
use crate::telemetry::metrics::{self, Health, Metrics};
use crate::token::{TokenSource, rfc3339};
use crate::usage::Accounting;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot set up the IdP client: {0}")]
    Client(String),
    #[error("cannot bind the control socket {path}: {error}")]
    Control { path: String, error: std::io::Error },
    #[error("cannot set up the proxy: {0}")]
    Proxy(crate::proxy::SetupError),
    /// `key` is the setting that names `addr`.
    #[error("cannot listen on {addr} ({key}): {error}")]
    Listen {
        key: &'static str,
        addr: String,
        error: std::io::Error,
    },
    /// A `proxy.listen` address could not be bound; the error names the address.
    #[error("{0} (proxy.listen: stop what holds it, or give another address)")]
    Bind(std::io::Error),
}

/// A request to apply new settings (already loaded and validated), or why the configuration could
/// not be loaded (for `status`).
pub struct Reload {
    pub settings: Result<Settings, String>,
}

/// The parts that are replaced on reload.
#[derive(Clone)]
struct Live {
    /// `[auth]`'s: the profile `default`.
    tokens: TokenSource,
    /// `[profiles.NAME]`'s, by name.
    profiles: BTreeMap<String, TokenSource>,
    proxy: Option<Proxy>,
}

impl Live {
    /// Every token source, `default` first.
    fn all(&self) -> Vec<(String, TokenSource)> {
        std::iter::once((DEFAULT_PROFILE.to_string(), self.tokens.clone()))
            .chain(self.profiles.iter().map(|(n, t)| (n.clone(), t.clone())))
            .collect()
    }
}

/// A profile's token source, built from settings with its disk cache loaded and checked.
async fn token_source(
    settings: &Settings,
    name: &str,
    clock: SharedClock,
    metrics: &Arc<Metrics>,
) -> Result<TokenSource, String> {
    let s = settings
        .profile(name)
        .ok_or_else(|| format!("no profile `{name}`"))?;
    let t = TokenSource::new(&s, clock)?;
    t.attach_metrics_as(metrics.clone(), name);
    t.load_cache().await;
    t.check_cache().await;
    Ok(t)
}

/// The proxy over `tokens` and the profiles' token sources.
fn build_proxy(
    settings: &Settings,
    tokens: &TokenSource,
    profiles: &BTreeMap<String, TokenSource>,
) -> Result<Proxy, crate::proxy::SetupError> {
    let routes = profiles
        .iter()
        .map(|(name, t)| ProxyProfile {
            name: name.clone(),
            tokens: t.clone(),
            upstream: settings.profiles.get(name).and_then(|p| p.upstream.clone()),
        })
        .collect();
    Proxy::with_profiles(&settings.proxy, tokens.clone(), routes)
}

/// What `/readyz`, `status` and sd_notify ask about the running parts.
struct State {
    live: RwLock<Live>,
    metrics: Arc<Metrics>,
    /// Usage counts and budgets: one for the daemon's life, whatever reloads change.
    accounting: Arc<Accounting>,
    started_at: SystemTime,
    settings: RwLock<Settings>,
    /// The proxy's bound addresses (port 0 resolved).
    addresses: RwLock<Vec<ListenAddr>>,
    /// The local keys (`proxy.keys_file`, read at start; a reload keeps this store).
    keys: Option<Arc<KeyStore>>,
    /// When the last reload was refused, and why, until one succeeds.
    reload_refused: Mutex<Option<(SystemTime, String)>>,
}

impl State {
    fn live(&self) -> Live {
        self.live.read().expect("live lock").clone()
    }

    /// Logs a refused reload and keeps it for `status`; returns the line for systemd's
    /// `STATUS=`.
    fn refuse_reload(&self, error: String) -> String {
        let line = format!("reload refused, the previous configuration keeps running: {error}");
        tracing::error!("{line}");
        *self.reload_refused.lock().expect("reload lock") = Some((SystemTime::now(), error));
        line
    }

    fn daemon_json(&self) -> Value {
        let s = self.settings.read().expect("settings lock");
        json!({
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "started_at": rfc3339(self.started_at),
            "config": s.path.as_ref().map(|p| p.display().to_string()),
            "control_socket": s.control.socket.display().to_string(),
            "identity": control::Identity::of(&s.auth),
            "profiles": std::iter::once((DEFAULT_PROFILE.to_string(), control::Identity::of(&s.auth)))
                .chain(s.profiles.iter().map(|(n, p)| (n.clone(), control::Identity::of(&p.auth))))
                .collect::<BTreeMap<_, _>>(),
            "upstream": s.proxy.upstream.as_ref().map(|u| u.to_string()),
            "egress": s.proxy.egress.describe(),
            "listen": self.addresses.read().expect("addresses lock").iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "require_key": s.proxy.require_key,
            "reload_refused": self.reload_refused.lock().expect("reload lock").as_ref()
                .map(|(at, error)| json!({"at": rfc3339(*at), "error": error})),
        })
    }
}

impl Health for State {
    fn before_scrape(&self, metrics: &Metrics) {
        for (_, t) in self.live().all() {
            t.update_gauges(metrics);
        }
    }

    fn ready(&self, profile: Option<&str>) -> Result<(), String> {
        let live = self.live();
        let tokens = match profile {
            None => live.tokens,
            Some(name) => match live.all().into_iter().find(|(n, _)| n == name) {
                Some((_, t)) => t,
                None => return Err(format!("no profile `{name}`")),
            },
        };
        if tokens.is_ready() {
            Ok(())
        } else {
            Err(tokens
                .status()
                .last_error
                .unwrap_or_else(|| "no valid token yet".to_string()))
        }
    }
}

/// A built daemon, listeners bound, not yet running.
pub struct App {
    state: Arc<State>,
    control: Listener,
    proxy_listeners: Vec<Bound>,
    metrics_listener: Option<TcpListener>,
    log: Option<LogHandle>,
}

impl App {
    /// Builds the token engine (loading the disk cache), the proxy, and binds every listener.
    pub async fn build(settings: Settings, clock: SharedClock) -> Result<App, StartError> {
        let metrics = Arc::new(Metrics::new());
        let accounting = Arc::new(Accounting::new(
            &settings.usage,
            settings.budget.clone(),
            clock.clone(),
        ));
        accounting.attach_metrics(metrics.clone());
        let keys = settings
            .proxy
            .keys_file
            .as_deref()
            .map(|p| Arc::new(KeyStore::open_or_empty(p, clock.clone())));
        let tokens = TokenSource::new(&settings, clock.clone()).map_err(StartError::Client)?;
        tokens.attach_metrics_as(metrics.clone(), DEFAULT_PROFILE);
        let mut profiles = BTreeMap::new();
        for name in settings.profiles.keys() {
            let t = token_source(&settings, name, clock.clone(), &metrics)
                .await
                .map_err(|e| StartError::Client(format!("profile `{name}`: {e}")))?;
            profiles.insert(name.clone(), t);
        }
        let (proxy, proxy_listeners) = match &settings.proxy.upstream {
            Some(_) => {
                let proxy =
                    build_proxy(&settings, &tokens, &profiles).map_err(StartError::Proxy)?;
                proxy.attach_metrics(metrics.clone());
                proxy.attach_accounting(accounting.clone());
                if let Some(keys) = &keys {
                    proxy.attach_keys(keys.clone());
                }
                let inherited =
                    inherited_listeners(settings.proxy.allow_remote && settings.proxy.require_key);
                let listeners = match inherited.map_err(|error| StartError::Listen {
                    key: "LISTEN_FDS",
                    addr: "the sockets systemd passed".to_string(),
                    error,
                })? {
                    Some(l) => l.into_iter().map(|l| (None, Arc::new(l))).collect(),
                    None => Proxy::bind(&settings.proxy.listen)
                        .await
                        .map_err(StartError::Bind)?
                        .into_iter()
                        .zip(&settings.proxy.listen)
                        .map(|(l, addr)| (Some(addr.clone()), Arc::new(l)))
                        .collect(),
                };
                (Some(proxy), listeners)
            }
            None => {
                tracing::warn!(
                    "proxy.upstream is not set: running the token engine only (set it, or BEHEST_BASE_URL, to serve the proxy)"
                );
                (None, Vec::new())
            }
        };
        let metrics_listener = match settings.telemetry.metrics_listen {
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|error| StartError::Listen {
                            key: "telemetry.metrics_listen",
                            addr: addr.to_string(),
                            error,
                        })?,
                )
            }
            None => None,
        };
        // Last: a start that fails on a listen address leaves no control socket behind.
        let control = control::bind(
            &settings.control.socket,
            settings.control.socket_mode,
            settings.control.dir_mode,
        )
        .await
        .map_err(|error| StartError::Control {
            path: settings.control.socket.display().to_string(),
            error,
        })?;
        tokens.load_cache().await;
        tokens.check_cache().await;
        let addresses = local_addresses(&proxy_listeners);
        Ok(App {
            state: Arc::new(State {
                live: RwLock::new(Live {
                    tokens,
                    profiles,
                    proxy,
                }),
                metrics,
                accounting,
                started_at: SystemTime::now(),
                reload_refused: Mutex::new(None),
                settings: RwLock::new(settings),
                addresses: RwLock::new(addresses),
                keys,
            }),
            control,
            proxy_listeners,
            metrics_listener,
            log: None,
        })
    }

    /// Lets reloads change the log level.
    pub fn with_log_handle(mut self, log: LogHandle) -> Self {
        self.log = Some(log);
        self
    }

    pub fn tokens(&self) -> TokenSource {
        self.state.live().tokens
    }

    /// The token engine of `profile` (`None`: the default one), if the agent serves it.
    pub fn profile_tokens(&self, profile: Option<&str>) -> Option<TokenSource> {
        let name = profile.unwrap_or(DEFAULT_PROFILE);
        self.state
            .live()
            .all()
            .into_iter()
            .find_map(|(n, t)| (n == name).then_some(t))
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.state.metrics.clone()
    }

    /// The local keys, when `proxy.require_key` is on.
    pub fn keys(&self) -> Option<Arc<KeyStore>> {
        let require = self
            .state
            .settings
            .read()
            .expect("settings lock")
            .proxy
            .require_key;
        self.state.keys.clone().filter(|_| require)
    }

    /// The usage counts and budgets.
    pub fn accounting(&self) -> Arc<Accounting> {
        self.state.accounting.clone()
    }

    /// The proxy's bound addresses (a `:0` port resolved).
    pub fn proxy_addresses(&self) -> Vec<ListenAddr> {
        self.state.addresses.read().expect("addresses lock").clone()
    }

    /// The metrics listener's address, when configured.
    pub fn metrics_address(&self) -> Option<std::net::SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Runs until `shutdown` (no reloads).
    pub async fn run(self, shutdown: CancellationToken) {
        let (_tx, rx) = mpsc::channel(1);
        self.run_with_reloads(shutdown, rx).await;
    }

    /// Runs until `shutdown`, applying each settings change that arrives on `reloads`.
    pub async fn run_with_reloads(
        self,
        shutdown: CancellationToken,
        mut reloads: mpsc::Receiver<Reload>,
    ) {
        let tracker = TaskTracker::new();
        let state = self.state.clone();
        let control_state = {
            let st = state.clone();
            let st2 = state.clone();
            ControlState {
                tokens: Arc::new(move || st.live().tokens),
                profiles: Some(Arc::new({
                    let st = state.clone();
                    move || st.live().all()
                })),
                daemon: Arc::new(move || st2.daemon_json()),
                live: Some(Arc::new({
                    let st = state.clone();
                    move || st.live().proxy.map(|p| p.stats()).unwrap_or(Value::Null)
                })),
                usage: Some(state.accounting.clone()),
                keys: state.keys.clone(),
                shutdown: shutdown.clone(),
            }
        };
        tracker.spawn(control::serve(
            self.control,
            control_state,
            shutdown.clone(),
        ));
        if let Some(l) = self.metrics_listener {
            tracker.spawn(metrics::serve(
                l,
                state.metrics.clone(),
                state.clone(),
                shutdown.clone(),
            ));
        }
        tracker.spawn(service::watchdog(shutdown.clone()));

        // The parts a reload replaces run under their own cancellation tokens.
        let mut generation = Generation::start(&tracker, state.live(), &shutdown);
        let mut serving = ProxyServing::start(
            &tracker,
            state.live().proxy,
            self.proxy_listeners,
            &shutdown,
        );
        // Accept loops a reload stopped, whose connections still serve.
        let mut draining: Vec<ProxyServing> = Vec::new();
        let mut reporter = shutdown.child_token();
        tracker.spawn(service::report(state.live().tokens, reporter.clone()));
        {
            let s = state.settings.read().expect("settings lock");
            tracing::info!(
                control = %s.control.socket.display(),
                listen = ?state.addresses.read().expect("addresses lock").iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                upstream = s.proxy.upstream.as_ref().map(|u| u.as_str()).unwrap_or("-"),
                "behest-agent running"
            );
        }

        loop {
            let reload = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = reloads.recv() => match r { Some(r) => r, None => { shutdown.cancelled().await; break; } },
            };
            let settings = match reload.settings {
                Ok(settings) => settings,
                Err(e) => {
                    service::status(&state.refuse_reload(e));
                    continue;
                }
            };
            service::reloading();
            // The new listeners first: an address that cannot be bound keeps the old
            // configuration running, on the old listeners.
            let listeners = match &settings.proxy.upstream {
                Some(_) => serving.listeners_for(&settings.proxy.listen).await,
                None => Ok(Vec::new()),
            };
            let listeners = match listeners {
                Ok(l) => l,
                Err(e) => {
                    service::reloaded(&state.refuse_reload(e.to_string()));
                    continue;
                }
            };
            let status = match apply(&state, settings, self.log.as_ref()).await {
                Ok(Applied {
                    tokens_changed,
                    proxy_changed,
                    listen_changed,
                }) => {
                    generation.sync(&tracker, &state.live(), &shutdown);
                    if tokens_changed {
                        reporter.cancel();
                        reporter = shutdown.child_token();
                        tracker.spawn(service::report(state.live().tokens, reporter.clone()));
                    }
                    if listen_changed {
                        // The new accept loops start before the old ones stop; an address in
                        // both shares its socket, so no client is refused in between. The old
                        // loops' connections go on with the new configuration, then drain.
                        let next =
                            ProxyServing::start(&tracker, state.live().proxy, listeners, &shutdown);
                        if let (Some(old), Some(new)) = (&serving.proxy, &next.proxy) {
                            old.replace_with(new);
                        }
                        serving.stop();
                        draining.push(std::mem::replace(&mut serving, next));
                        *state.addresses.write().expect("addresses lock") =
                            local_addresses(&serving.listeners);
                    } else if proxy_changed {
                        serving.swap(state.live().proxy);
                        // `status` reads the proxy that serves (its open connections), now
                        // forwarding with the new configuration.
                        state.live.write().expect("live lock").proxy = serving.proxy.clone();
                    }
                    draining.retain(|d| !d.finished());
                    if let Some(current) = &serving.proxy {
                        for old in draining.iter().filter_map(|d| d.proxy.as_ref()) {
                            old.forward_with(current);
                        }
                    }
                    *state.reload_refused.lock().expect("reload lock") = None;
                    tracing::info!("configuration reloaded");
                    service::describe(&state.live().tokens)
                }
                Err(e) => state.refuse_reload(e.to_string()),
            };
            service::reloaded(&status);
        }

        service::stopping();
        // The listening sockets close now (not after the drain): new clients are refused.
        drop((serving, draining));
        tracing::info!("stopping: no new connections; letting in-flight requests finish");
        tracker.close();
        tracker.wait().await;
        state.accounting.flush().await;
        if let Some(keys) = &state.keys
            && let Err(e) = keys.persist()
        {
            tracing::warn!("the local keys' last use was not saved: {e}");
        }
        // The control socket's file went with its listener (only if still this daemon's: a new
        // daemon may have bound the path while this one drained).
        tracing::info!("behest-agent stopped");
    }
}

/// TCP sockets passed by systemd socket activation (`behest-agent.socket`), when there are any; they
/// replace `proxy.listen` and obey its rule: a non-loopback address needs `proxy.allow_remote` and
/// `proxy.require_key` (`allow_remote` here: both).
fn inherited_listeners(allow_remote: bool) -> std::io::Result<Option<Vec<Listener>>> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() == 0 {
        return Ok(None);
    }
    let mut out = Vec::new();
    for i in 0..fds.len() {
        if let Some(l) = fds.take_tcp_listener(i)? {
            let addr = l.local_addr()?;
            if !addr.ip().is_loopback() && !allow_remote {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "systemd passed a socket on {addr}, which is not a loopback address: the proxy injects this machine's credential, so anyone who can reach it can use it. Set ListenStream=127.0.0.1:{} in behest-agent.socket, or proxy.allow_remote = true and proxy.require_key = true if that is really intended",
                        addr.port()
                    ),
                ));
            }
            l.set_nonblocking(true)?;
            out.push(Listener::Tcp(TcpListener::from_std(l)?));
        }
    }
    tracing::info!(
        count = out.len(),
        "using sockets from systemd socket activation instead of proxy.listen"
    );
    Ok(Some(out))
}

/// The refreshers of the token sources (one per profile).
struct Generation {
    running: Vec<(TokenSource, CancellationToken)>,
}

impl Generation {
    fn start(tracker: &TaskTracker, live: Live, shutdown: &CancellationToken) -> Self {
        let mut g = Generation {
            running: Vec::new(),
        };
        g.sync(tracker, &live, shutdown);
        g
    }

    /// Runs a refresher for each of `live`'s token sources: a kept one keeps its refresher, a new
    /// one gets its own, and one no longer there is stopped.
    fn sync(&mut self, tracker: &TaskTracker, live: &Live, shutdown: &CancellationToken) {
        let wanted: Vec<TokenSource> = live.all().into_iter().map(|(_, t)| t).collect();
        self.running.retain(|(t, stop)| {
            let keep = wanted.iter().any(|w| w.same(t));
            if !keep {
                stop.cancel();
            }
            keep
        });
        for t in wanted {
            if self.running.iter().any(|(r, _)| r.same(&t)) {
                continue;
            }
            let stop = shutdown.child_token();
            let s = stop.clone();
            let run = t.clone();
            tracker.spawn(async move { run.run(s).await });
            self.running.push((t, stop));
        }
    }
}

/// A proxy listener, and the address of `proxy.listen` it was bound for (`None`: passed by
/// systemd). Shared by the accept loops of consecutive configurations.
type Bound = (Option<ListenAddr>, Arc<Listener>);

fn local_addresses(listeners: &[Bound]) -> Vec<ListenAddr> {
    listeners
        .iter()
        .filter_map(|(_, l)| l.local_addr().ok())
        .collect()
}

/// How long the connections of accept loops a reload stopped serve before they drain.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

/// The proxy's accept loop over its listeners.
struct ProxyServing {
    stop: CancellationToken,
    /// Drains its connections: at a reload, [`SETTLE`] after `stop`; at shutdown, at once.
    drain: CancellationToken,
    proxy: Option<Proxy>,
    listeners: Vec<Bound>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ProxyServing {
    fn start(
        tracker: &TaskTracker,
        proxy: Option<Proxy>,
        listeners: Vec<Bound>,
        shutdown: &CancellationToken,
    ) -> Self {
        let (stop, drain) = (shutdown.child_token(), shutdown.child_token());
        let mut task = None;
        if let Some(p) = proxy.clone()
            && !listeners.is_empty()
        {
            let (stop, drain) = (stop.clone(), drain.clone());
            let shared: Vec<Arc<Listener>> = listeners.iter().map(|(_, l)| l.clone()).collect();
            task = Some(tracker.spawn(async move { p.serve_until(shared, stop, drain).await }));
        }
        ProxyServing {
            stop,
            drain,
            proxy,
            listeners,
            task,
        }
    }

    /// Its accept loops and connections are all done.
    fn finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// The listeners for `listen`: each address already listened on keeps its socket (port 0
    /// keeps its port), a new one is bound. Sockets passed by systemd stay, whatever
    /// `proxy.listen` says.
    async fn listeners_for(&self, listen: &[ListenAddr]) -> std::io::Result<Vec<Bound>> {
        if !self.listeners.is_empty() && self.listeners.iter().all(|(a, _)| a.is_none()) {
            return Ok(self.listeners.clone());
        }
        let mut out = Vec::with_capacity(listen.len());
        for addr in listen {
            let kept = self
                .listeners
                .iter()
                .find(|(a, _)| a.as_ref() == Some(addr));
            let listener = match kept {
                Some((_, l)) => l.clone(),
                None => Arc::new(Proxy::bind(std::slice::from_ref(addr)).await?.remove(0)),
            };
            out.push((Some(addr.clone()), listener));
        }
        Ok(out)
    }

    /// Hands new requests on the same listeners to `proxy` (new upstream, token source, timeouts).
    /// The serving proxy stays the one kept here: the next swap must replace its forwarder again,
    /// not that of `proxy`, which serves nothing itself.
    fn swap(&mut self, proxy: Option<Proxy>) {
        match (&self.proxy, &proxy) {
            (Some(serving), Some(new)) => serving.replace_with(new),
            _ => self.proxy = proxy,
        }
    }

    /// Stops accepting, and lets go of its listeners (those the next accept loops share stay
    /// open). Its connections drain as at shutdown after [`SETTLE`]: one it has just accepted
    /// gets its request read first (a graceful close would drop it unread).
    fn stop(&mut self) {
        self.stop.cancel();
        self.listeners.clear();
        let drain = self.drain.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SETTLE).await;
            drain.cancel();
        });
    }
}

struct Applied {
    tokens_changed: bool,
    proxy_changed: bool,
    listen_changed: bool,
}

/// Applies new settings: what changed is rebuilt, what did not is kept (a kept token source keeps
/// its token: an unchanged identity makes no grant). Fails without changing anything.
async fn apply(
    state: &State,
    mut new: Settings,
    log: Option<&LogHandle>,
) -> Result<Applied, String> {
    let old = state.settings.read().expect("settings lock").clone();
    at_restart(
        "control.socket",
        &old.control.socket,
        &mut new.control.socket,
    );
    at_restart(
        "control.socket_mode",
        &old.control.socket_mode,
        &mut new.control.socket_mode,
    );
    at_restart(
        "proxy.keys_file",
        &old.proxy.keys_file,
        &mut new.proxy.keys_file,
    );
    at_restart("[egress]", &old.proxy.egress, &mut new.proxy.egress);
    at_restart(
        "usage.ledger_file",
        &old.usage.ledger_file,
        &mut new.usage.ledger_file,
    );
    at_restart(
        "usage.ledger_max_size",
        &old.usage.ledger_max_size,
        &mut new.usage.ledger_max_size,
    );
    at_restart(
        "telemetry.log_format",
        &old.telemetry.log_format,
        &mut new.telemetry.log_format,
    );
    at_restart(
        "telemetry.metrics_listen",
        &old.telemetry.metrics_listen,
        &mut new.telemetry.metrics_listen,
    );
    let identity_changed = format!("{:?}{:?}{:?}", old.auth, old.token, old.fleet)
        != format!("{:?}{:?}{:?}", new.auth, new.token, new.fleet);
    let live = state.live();
    let clock = live.tokens.clock().clone();
    let tokens = if identity_changed {
        token_source(&new, DEFAULT_PROFILE, clock.clone(), &state.metrics).await?
    } else {
        live.tokens.clone()
    };
    // A profile whose identity (its `[auth]` and token checks) and `[fleet]` are unchanged keeps
    // its token source, and so its token: no grant. The others get new ones.
    let mut profiles = BTreeMap::new();
    for (name, p) in &new.profiles {
        let kept = old.profiles.get(name).and_then(|o| {
            (format!("{:?}{:?}", o.auth, o.token) == format!("{:?}{:?}", p.auth, p.token)
                && old.fleet == new.fleet)
                .then(|| live.profiles.get(name).cloned())
                .flatten()
        });
        let t = match kept {
            Some(t) => t,
            None => token_source(&new, name, clock.clone(), &state.metrics)
                .await
                .map_err(|e| format!("profile `{name}`: {e}"))?,
        };
        profiles.insert(name.clone(), t);
    }
    let profiles_changed = profiles.len() != live.profiles.len()
        || profiles
            .iter()
            .any(|(n, t)| !live.profiles.get(n).is_some_and(|o| o.same(t)))
        || format!("{:?}", old.profiles) != format!("{:?}", new.profiles);
    let proxy_changed = identity_changed
        || profiles_changed
        || format!("{:?}", old.proxy) != format!("{:?}", new.proxy);
    let listen_changed = old.proxy.listen != new.proxy.listen
        || old.proxy.upstream.is_some() != new.proxy.upstream.is_some()
        || old.proxy.max_connections != new.proxy.max_connections
        || old.proxy.header_read_timeout != new.proxy.header_read_timeout
        || old.proxy.shutdown_grace != new.proxy.shutdown_grace;
    let proxy = if proxy_changed {
        match &new.proxy.upstream {
            Some(_) => {
                let p = build_proxy(&new, &tokens, &profiles).map_err(|e| e.to_string())?;
                if let Some(old) = &live.proxy {
                    p.count_with(old);
                }
                p.attach_metrics(state.metrics.clone());
                p.attach_accounting(state.accounting.clone());
                if let Some(keys) = &state.keys {
                    p.attach_keys(keys.clone());
                }
                Some(p)
            }
            None => None,
        }
    } else {
        live.proxy.clone()
    };
    if let Some(log) = log
        && let Err(e) = log.set_level(&new.telemetry.log_level)
    {
        tracing::warn!("log level not changed: {e}");
    }
    state.accounting.configure(&new.usage, new.budget.clone());
    *state.live.write().expect("live lock") = Live {
        tokens,
        profiles,
        proxy,
    };
    for gone in old
        .profiles
        .keys()
        .filter(|n| !new.profiles.contains_key(*n))
    {
        state.metrics.forget_profile(gone);
    }
    *state.settings.write().expect("settings lock") = new;
    Ok(Applied {
        tokens_changed: identity_changed,
        proxy_changed,
        listen_changed,
    })
}

/// A key that applies only at start: its change is logged, and the value in force stays in the
/// settings (what `status` shows, and what the next reload compares with: a change back is none).
fn at_restart<T: Clone + PartialEq>(key: &str, old: &T, new: &mut T) {
    if old != new {
        tracing::warn!("{key} changed: it applies after a restart");
        *new = old.clone();
    }
}
