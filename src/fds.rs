//! File descriptors: how many the process may open (`RLIMIT_NOFILE`), and how many of them the
//! proxy's connections may take. systemd and most shells start a process with a soft limit of
//! 1024 and a far higher hard one, expecting a server to raise its own; `run` and `dev` do
//! ([`raise_soft_limit`]), and the proxy sizes its connection bounds to the limit in force
//! ([`fit`]), so that a flood of connections can never leave the control socket, the metrics
//! endpoint or the IdP without a descriptor. It never lowers a limit and never needs a privilege:
//! a process may raise its soft limit up to its hard one.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::config::ProxySettings;
use crate::server::Limits;

/// Descriptors kept for everything that is not a proxied connection: the control socket's and the
/// metrics endpoint's connections ([`Limits::LOCAL`] each), and 64 for the rest (listeners, the
/// runtime's epoll and event descriptors, standard streams, the IdP, JWKS and fleet connections,
/// the cache and lock files).
pub const RESERVED: u64 = 2 * Limits::LOCAL.max_connections as u64 + 64;

/// The soft `RLIMIT_NOFILE` in force, `None` when it cannot be read.
pub fn soft_limit() -> Option<u64> {
    getrlimit(Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, and returns the soft limit now in force.
/// Where raising is not allowed (a systemd unit's `SystemCallFilter=~@resources` makes
/// `setrlimit` fail with `EPERM`; the unit sets `LimitNOFILE=` instead), the limit is kept.
/// Only for the daemon: a command it spawns would inherit the raised limit, which some programs
/// do not expect.
pub fn raise_soft_limit() -> Option<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft >= hard {
        return Some(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => Some(hard),
        Err(e) => {
            tracing::debug!(error = %e, soft, hard, "the file descriptor limit stays as it is");
            Some(soft)
        }
    }
}

/// How many client and upstream connections the proxy serves at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fit {
    pub clients: usize,
    pub upstream: usize,
}

/// The connection bounds that fit in `limit` descriptors besides [`RESERVED`]: the configured
/// ones when they fit (or the limit is unknown), else both lowered in proportion (at least one
/// each), with the warning to log.
pub fn fit(clients: usize, upstream: usize, limit: Option<u64>) -> (Fit, Option<String>) {
    let asked = Fit { clients, upstream };
    let Some(limit) = limit else {
        return (asked, None);
    };
    let need = clients as u64 + upstream as u64;
    let available = limit.saturating_sub(RESERVED);
    if need <= available {
        return (asked, None);
    }
    let lowered = (available * clients as u64 / need.max(1)).max(1);
    let fit = Fit {
        clients: lowered as usize,
        upstream: available.saturating_sub(lowered).max(1) as usize,
    };
    let warning = format!(
        "proxy.max_connections ({clients}) and proxy.max_upstream_connections ({upstream}) need up \
         to {} file descriptors, but this process may open {limit} (RLIMIT_NOFILE): serving at most \
         {} client and {} upstream connections. Raise the limit (LimitNOFILE= in the systemd unit, \
         `ulimit -n` in a shell) or lower those keys",
        need + RESERVED,
        fit.clients,
        fit.upstream,
    );
    (fit, Some(warning))
}

/// The warning to log when the proxy's configured connection bounds do not fit in the limit in
/// force (the proxy then serves the lowered ones).
pub fn warning(proxy: &ProxySettings) -> Option<String> {
    proxy.upstream.as_ref()?;
    fit(
        proxy.max_connections,
        proxy.max_upstream_connections,
        soft_limit(),
    )
    .1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_that_fit_are_kept() {
        let (f, warning) = fit(4096, 4096, Some(65536));
        assert_eq!((f.clients, f.upstream), (4096, 4096));
        assert_eq!(warning, None);
        assert_eq!(fit(4096, 4096, None).1, None);
        let exact = 10 + 20 + RESERVED;
        assert_eq!(fit(10, 20, Some(exact)).1, None);
    }

    #[test]
    fn bounds_that_do_not_fit_are_lowered_in_proportion_with_a_warning_naming_the_fix() {
        let (f, warning) = fit(4096, 4096, Some(1024));
        let available = (1024 - RESERVED) as usize;
        assert_eq!(f.clients + f.upstream, available);
        assert_eq!(f.clients, available / 2);
        let w = warning.expect("a warning");
        for part in [
            "proxy.max_connections (4096)",
            "proxy.max_upstream_connections (4096)",
            "may open 1024",
            "LimitNOFILE=",
            "ulimit -n",
        ] {
            assert!(w.contains(part), "{part:?} in {w}");
        }
        let (f, _) = fit(1000, 3000, Some(RESERVED + 400));
        assert_eq!((f.clients, f.upstream), (100, 300));
    }

    #[test]
    fn a_limit_below_the_reserve_still_leaves_one_connection_each() {
        let (f, warning) = fit(4096, 4096, Some(100));
        assert_eq!((f.clients, f.upstream), (1, 1));
        assert!(warning.is_some());
    }
}
