//! The checks that keep the proxy from being an open proxy or a target for a web page: `CONNECT`
//! refused; absolute-form requests only for the configured upstream; `Host` (`:authority` on h2)
//! a loopback name or the address the connection came in on (DNS-rebinding defence); a browser
//! `Origin` only when configured. They only read the request; they never choose where it goes.

use std::net::{IpAddr, SocketAddr};

use http::header::{HOST, ORIGIN, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Request, Version};

use super::UpstreamBase;
use super::error::ProxyError;

/// The methods an HTTP API uses pass. `CONNECT` asks for a tunnel (this is a reverse proxy),
/// `TRACE` would echo the request's credentials back (nginx refuses it too), and an unknown method
/// (`get` is one: methods are case-sensitive) reaches no API: all three get 405.
pub fn check_method(method: &Method) -> Result<(), ProxyError> {
    match *method {
        Method::GET
        | Method::HEAD
        | Method::POST
        | Method::PUT
        | Method::PATCH
        | Method::DELETE
        | Method::OPTIONS => Ok(()),
        Method::CONNECT => Err(ProxyError::MethodNotAllowed(
            "CONNECT is not supported: this is a reverse proxy to the configured upstream, not a forward proxy"
                .to_string(),
        )),
        _ => Err(ProxyError::MethodNotAllowed(format!(
            "the method {method} is not forwarded; the proxy forwards {FORWARDED_METHODS}"
        ))),
    }
}

/// The methods the proxy forwards (those an HTTP API uses), as the 405's `Allow` names them.
pub const FORWARDED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// Checks where the request says it is going and returns its path relative to the upstream's base
/// path (still percent-encoded, without the query). `local` is the TCP address the connection was
/// accepted on, `None` on a Unix socket (which no browser can reach, so any `Host` is accepted).
pub fn target<'a, B>(
    req: &'a Request<B>,
    local: Option<SocketAddr>,
    upstream: &UpstreamBase,
    allowed_hosts: &[String],
) -> Result<&'a str, ProxyError> {
    let uri = req.uri();
    let path = uri.path();
    if req.version() == Version::HTTP_2 {
        // h2 carries `:authority` (hyper puts it in the URI); it plays the part of `Host`. A `Host`
        // field beside it must pass too: RFC 9113 §8.3.1 has a request whose two differ refused.
        let authority = uri.authority().map(|a| a.as_str().as_bytes());
        for host in authority
            .into_iter()
            .chain(req.headers().get_all(HOST).iter().map(|h| h.as_bytes()))
        {
            check_host(host, local, allowed_hosts)?;
        }
        return Ok(path);
    }
    if let Some(authority) = uri.authority() {
        if uri.scheme().is_none() {
            // Authority-form (`GET host:443 HTTP/1.1`) is CONNECT's alone (RFC 9112 §3.2.3).
            return Err(ProxyError::BadRequest(format!(
                "the request target `{}` is a bare host (authority-form, for CONNECT only): \
                 send a path starting with `/`",
                truncate(authority.as_str())
            )));
        }
        // Absolute-form (`GET http://host/… HTTP/1.1`): RFC 9112 §3.2.2 says the target's authority
        // wins over `Host`. Only the configured upstream is served; its base path must be there.
        let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
            Some("https") => 443,
            _ => 80,
        });
        let host = authority.host();
        if !host.eq_ignore_ascii_case(&upstream.host) || port != upstream.port {
            return Err(ProxyError::ForbiddenHost(format!(
                "absolute-form request for `{}` refused: this proxy only forwards to {}",
                truncate(authority.as_str()),
                upstream.url
            )));
        }
        let base = upstream.base.as_str();
        return match path.strip_prefix(base) {
            Some("") => Ok("/"),
            Some(rest) if rest.starts_with('/') => Ok(rest),
            _ => Err(ProxyError::BadRequest(format!(
                "absolute-form path `{}` is not under the upstream's base path `{base}`",
                truncate(path)
            ))),
        };
    }
    let mut hosts = req.headers().get_all(HOST).iter();
    let host = hosts.next();
    if host.is_some() && hosts.next().is_some() {
        // RFC 9112 §3.2: a request with more than one Host is refused.
        return Err(ProxyError::BadRequest(
            "the request has more than one Host header".to_string(),
        ));
    }
    match host {
        Some(h) => check_host(h.as_bytes(), local, allowed_hosts)?,
        None if req.version() == Version::HTTP_11 => {
            return Err(ProxyError::BadRequest(
                "an HTTP/1.1 request needs a Host header".to_string(),
            ));
        }
        None => {}
    }
    Ok(path)
}

/// `Host` must name this machine's loopback (`localhost`, `*.localhost`, `127.x.y.z`, `[::1]`,
/// any port), the exact address the connection was accepted on, or a name in `allowed_hosts`
/// (`proxy.allowed_hosts`, any port).
pub fn check_host(
    value: &[u8],
    local: Option<SocketAddr>,
    allowed_hosts: &[String],
) -> Result<(), ProxyError> {
    let Some(local) = local else {
        return Ok(());
    };
    // An IPv4 client of a dual-stack `[::]` socket arrives at `[::ffff:a.b.c.d]`: it names
    // `a.b.c.d`.
    let local = SocketAddr::new(local.ip().to_canonical(), local.port());
    if host_allowed(value, local, allowed_hosts) {
        return Ok(());
    }
    Err(ProxyError::ForbiddenHost(format!(
        "Host `{}` is not this proxy: use 127.0.0.1, localhost or {} (requests for other names are refused to defeat DNS rebinding)",
        truncate(&String::from_utf8_lossy(value)),
        local
    )))
}

fn host_allowed(value: &[u8], local: SocketAddr, allowed_hosts: &[String]) -> bool {
    let Ok(value) = std::str::from_utf8(value) else {
        return false;
    };
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        let port = match after {
            "" => None,
            p => match p.strip_prefix(':') {
                Some(p) => Some(p),
                None => return false,
            },
        };
        (ip, port)
    } else {
        match value.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (value, None),
        }
    };
    // RFC 3986 allows an empty port (`host:`); anything else must be digits.
    let port = match port {
        None | Some("") => None,
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => match p.parse::<u16>() {
            Ok(p) => Some(p),
            Err(_) => return false,
        },
        Some(_) => return false,
    };
    if allowed_hosts.iter().any(|a| a.eq_ignore_ascii_case(host)) {
        return true;
    }
    const SUFFIX: &[u8] = b".localhost";
    let h = host.as_bytes();
    // RFC 6761: `localhost` and its subdomains always resolve to loopback.
    let hostname_chars = h
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || *b == b'.' || *b == b'-');
    if host.eq_ignore_ascii_case("localhost")
        || (hostname_chars
            && h.len() > SUFFIX.len()
            && h[h.len() - SUFFIX.len()..].eq_ignore_ascii_case(SUFFIX))
    {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() => true,
        Ok(ip) => ip.to_canonical() == local.ip() && port.is_none_or(|p| p == local.port()),
        Err(_) => false,
    }
}

/// A request with an `Origin` comes from a web page: refused unless that origin is configured.
pub fn check_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), ProxyError> {
    for origin in headers.get_all(ORIGIN) {
        if !allowed.iter().any(|a| a.as_bytes() == origin.as_bytes()) {
            return Err(ProxyError::ForbiddenOrigin(truncate(
                &String::from_utf8_lossy(origin.as_bytes()),
            )));
        }
    }
    Ok(())
}

/// A request body framed with `Transfer-Encoding` may carry `chunked` and nothing else: hyper
/// decodes the final `chunked`, and the header is hop-by-hop, so a coding before it (`gzip,
/// chunked`) would be dropped and the upstream would take compressed bytes for the body.
pub fn check_transfer_encoding(headers: &HeaderMap) -> Result<(), ProxyError> {
    let mut codings = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    match (codings.next(), codings.next()) {
        (None, _) => Ok(()),
        (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err(ProxyError::BadFraming(
            "Transfer-Encoding may only be `chunked`; send a compressed body with Content-Encoding instead"
                .to_string(),
        )),
    }
}

/// Keeps what a client sent short in an error message.
fn truncate(s: &str) -> String {
    match s.char_indices().nth(100) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> Option<SocketAddr> {
        Some("127.0.0.1:8711".parse().unwrap())
    }

    fn remote() -> Option<SocketAddr> {
        Some("10.1.2.3:8711".parse().unwrap())
    }

    #[test]
    fn loopback_names_and_the_listen_address_are_accepted() {
        for h in [
            "localhost",
            "LOCALHOST:8711",
            "api.localhost:1",
            "127.0.0.1",
            "127.0.0.1:8711",
            "127.1.2.3:9",
            "[::1]",
            "[::1]:8711",
        ] {
            assert!(check_host(h.as_bytes(), local(), &[]).is_ok(), "{h}");
        }
        assert!(check_host(b"10.1.2.3:8711", remote(), &[]).is_ok());
        assert!(check_host(b"10.1.2.3", remote(), &[]).is_ok());
        assert!(check_host(b"10.1.2.3:", remote(), &[]).is_ok());
        let v6 = Some("[fe80::1]:8711".parse().unwrap());
        assert!(check_host(b"[fe80::1]:8711", v6, &[]).is_ok());
        assert!(check_host(b"[FE80::1]:8711", v6, &[]).is_ok());
    }

    #[test]
    fn other_hosts_are_refused() {
        for h in [
            "evil.example",
            "evil.example:8711",
            "localhost.evil.example",
            "10.1.2.3:8711",
            "[::2]:8711",
            "127.0.0.1:notaport",
            "[::1",
            "",
        ] {
            let e = check_host(h.as_bytes(), local(), &[]).unwrap_err();
            assert_eq!(e.code(), "forbidden_host", "{h}");
        }
        for h in [
            "10.1.2.3:8712",
            "10.1.2.3:8711x",
            "10.1.2.3:87",
            "10.1.2.4:8711",
        ] {
            assert!(check_host(h.as_bytes(), remote(), &[]).is_err(), "{h}");
        }
    }

    #[test]
    fn an_ipv4_client_of_a_dual_stack_socket_names_its_ipv4_address() {
        let mapped: Option<SocketAddr> = "[::ffff:192.0.2.2]:8711".parse().ok();
        assert!(check_host(b"192.0.2.2:8711", mapped, &[]).is_ok());
        assert!(check_host(b"192.0.2.3:8711", mapped, &[]).is_err());
    }

    #[test]
    fn unix_socket_connections_accept_any_host() {
        assert!(check_host(b"evil.example", None, &[]).is_ok());
    }

    #[test]
    fn allowed_hosts_are_accepted_with_any_port_and_nothing_else() {
        let allowed = ["behest-agent".to_string(), "agent.ci.svc".to_string()];
        for h in ["behest-agent", "Behest-Agent:8711", "agent.ci.svc:80"] {
            assert!(check_host(h.as_bytes(), remote(), &allowed).is_ok(), "{h}");
        }
        for h in ["behest-agent.evil", "evil.example", "agent.ci.svc.evil:80"] {
            assert!(check_host(h.as_bytes(), remote(), &allowed).is_err(), "{h}");
            assert!(check_host(h.as_bytes(), remote(), &[]).is_err(), "{h}");
        }
        assert!(check_host(b"behest-agent", remote(), &[]).is_err());
    }

    #[test]
    fn origin_must_be_configured_exactly() {
        let mut h = HeaderMap::new();
        assert!(check_origin(&h, &[]).is_ok());
        h.insert(ORIGIN, "https://app.example".parse().unwrap());
        assert_eq!(
            check_origin(&h, &[]).unwrap_err().code(),
            "forbidden_origin"
        );
        assert!(check_origin(&h, &["https://app.example".to_string()]).is_ok());
        assert!(check_origin(&h, &["https://app.example/".to_string()]).is_err());
        h.insert(ORIGIN, "null".parse().unwrap());
        assert!(check_origin(&h, &["https://app.example".to_string()]).is_err());
    }

    #[test]
    fn connect_is_refused() {
        assert_eq!(
            check_method(&Method::CONNECT).unwrap_err().code(),
            "method_not_allowed"
        );
        assert!(check_method(&Method::POST).is_ok());
    }

    #[test]
    fn only_a_plain_chunked_transfer_encoding_is_accepted() {
        let te = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(TRANSFER_ENCODING, v.parse().unwrap());
            }
            check_transfer_encoding(&h)
        };
        assert!(te(&[]).is_ok());
        assert!(te(&["chunked"]).is_ok());
        assert!(te(&["Chunked "]).is_ok());
        for bad in [
            &["gzip, chunked"][..],
            &["gzip", "chunked"],
            &["chunked, chunked"],
            &["deflate,chunked"],
        ] {
            assert_eq!(te(bad).unwrap_err().code(), "bad_request", "{bad:?}");
        }
    }
}
