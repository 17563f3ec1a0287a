//! The request path, made safe to put under the upstream's base path: the `/s/SESSION/` prefix taken
//! off (its session id checked), percent-encoded separators refused, dot segments removed, and a
//! path that would climb above the base refused. It only ever yields a path: the upstream's scheme
//! and authority come from the configuration, never from here.

use std::borrow::Cow;

use http::HeaderValue;
use percent_encoding::percent_decode;

use super::error::ProxyError;

/// The longest session id accepted.
pub const MAX_SESSION_ID: usize = 128;

/// A request path split into its session (from `/s/ID/`) and the path to forward.
#[derive(Debug, PartialEq, Eq)]
pub struct Resolved<'a> {
    /// The profile `/p/NAME/` names (as sent: looked up, never forwarded).
    pub profile: Option<&'a str>,
    pub session: Option<HeaderValue>,
    /// Starts with `/`; relative to the upstream's base path; no dot segments.
    pub path: Cow<'a, str>,
}

/// Resolves `raw` (an origin-form path, still percent-encoded, without the query).
pub fn resolve(raw: &str) -> Result<Resolved<'_>, ProxyError> {
    if !raw.starts_with('/') {
        return Err(ProxyError::BadRequest(
            "the request target must be a path starting with `/`".to_string(),
        ));
    }
    // `/p/NAME/s/ID/`, or the other way round.
    let (mut profile, raw) = prefix(raw, "/p/");
    let (session, mut rest) = prefix(raw, "/s/");
    if profile.is_none() && session.is_some() {
        (profile, rest) = prefix(rest, "/p/");
    }
    let session = session.map(session_id).transpose()?;
    Ok(Resolved {
        profile,
        session,
        path: normalize(rest)?,
    })
}

/// `/{tag}VALUE/rest` split into `VALUE` and `/rest`; `raw` as it is without that prefix.
fn prefix<'a>(raw: &'a str, tag: &str) -> (Option<&'a str>, &'a str) {
    match raw.strip_prefix(tag) {
        Some(after) => match after.find('/') {
            Some(i) => (Some(&after[..i]), &after[i..]),
            None => (Some(after), "/"),
        },
        None => (None, raw),
    }
}

/// Checks a session id (percent-decoded) and makes it a header value.
pub fn session_id(raw: &str) -> Result<HeaderValue, ProxyError> {
    let decoded: Cow<'_, [u8]> = percent_decode(raw.as_bytes()).into();
    if !valid_session(&decoded) {
        return Err(ProxyError::BadRequest(format!(
            "the session id in /s/ID/ must be 1 to {MAX_SESSION_ID} visible ASCII characters"
        )));
    }
    // The prefix is read before dot segments are resolved: `/s/../v1` is a path, not a session.
    if matches!(&decoded[..], b"." | b"..") {
        return Err(ProxyError::BadRequest(
            "the session id in /s/ID/ cannot be `.` or `..`".to_string(),
        ));
    }
    HeaderValue::from_bytes(&decoded).map_err(|_| {
        ProxyError::BadRequest("the session id in /s/ID/ is not a valid header value".to_string())
    })
}

/// A session id as sent upstream: 1 to [`MAX_SESSION_ID`] visible ASCII characters. The one rule
/// for `/s/ID/`, `X-Session-Id` and `proxy.session_id`.
pub fn valid_session(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= MAX_SESSION_ID && id.iter().all(|b| (0x21..=0x7e).contains(b))
}

fn escape() -> ProxyError {
    ProxyError::BadRequest(
        "the path leaves the upstream's base path (`..` segments above it); use a path under it"
            .to_string(),
    )
}

/// Removes dot segments (RFC 3986 §5.2.4) after percent-decoding each segment; refuses a path that
/// climbs above its root, an encoded `/` or `\`, a NUL, and `..;`-style segments some servers
/// read as `..`. Segments are forwarded as they came (still encoded).
pub fn normalize(path: &str) -> Result<Cow<'_, str>, ProxyError> {
    debug_assert!(path.starts_with('/'));
    // The common case, `/v1/chat/completions`: nothing to decode, no dot segment.
    let plain = !path.contains(['%', '\\']) && !path.contains("/.");
    if plain {
        return Ok(Cow::Borrowed(path));
    }
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in path[1..].split('/') {
        let decoded: Cow<'_, [u8]> = percent_decode(seg.as_bytes()).into();
        if decoded.iter().any(|&b| b == b'/' || b == b'\\' || b == 0) {
            return Err(ProxyError::BadRequest(
                "the path has an encoded `/` or `\\` (%2F, %5C) or a NUL; send separators unencoded"
                    .to_string(),
            ));
        }
        let head = decoded.split(|&b| b == b';').next().unwrap_or(&[]);
        let is_dot = head == b"." || head == b"..";
        if is_dot && head.len() != decoded.len() {
            return Err(ProxyError::BadRequest(
                "the path has a dot segment with parameters (`..;`)".to_string(),
            ));
        }
        match &decoded[..] {
            b"." => trailing_slash = true,
            b".." => {
                kept.pop().ok_or_else(escape)?;
                trailing_slash = true;
            }
            _ => {
                kept.push(seg);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for seg in &kept {
        out.push('/');
        out.push_str(seg);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(p: &str) -> String {
        normalize(p).unwrap().into_owned()
    }

    #[test]
    fn plain_paths_pass_unchanged_and_unallocated() {
        for p in ["/v1/chat/completions", "/v1/files/a.b", "/v1/x..y/"] {
            assert!(matches!(normalize(p).unwrap(), Cow::Borrowed(_)), "{p}");
        }
        for p in ["/v1/.x", "/v1/%41", "/.", "/a\\b"] {
            assert!(!matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
        assert_eq!(ok("/v1/models/"), "/v1/models/");
        assert_eq!(ok("/"), "/");
        // Empty segments stay: `//host/x` is a path under the base, never an authority.
        assert_eq!(ok("//evil.example/x"), "//evil.example/x");
    }

    #[test]
    fn dot_segments_inside_the_base_are_removed() {
        assert_eq!(ok("/v1/x/../models"), "/v1/models");
        assert_eq!(ok("/v1/./models"), "/v1/models");
        assert_eq!(ok("/v1/%2e%2E/v1/models"), "/v1/models");
        assert_eq!(ok("/v1/.."), "/");
        assert_eq!(ok("/v1/x/."), "/v1/x/");
        assert_eq!(ok("/v1/%41b"), "/v1/%41b");
    }

    #[test]
    fn paths_climbing_above_the_base_are_refused() {
        for p in [
            "/..",
            "/../x",
            "/v1/../../x",
            "/%2e%2e/x",
            "/v1/%2E%2e/%2e./x",
            "/./../x",
        ] {
            assert!(normalize(p).is_err(), "{p}");
        }
    }

    #[test]
    fn encoded_separators_and_dot_parameters_are_refused() {
        for p in [
            "/v1/a%2Fb",
            "/v1/a%2fb",
            "/v1/%5C..",
            "/v1/a\\b",
            "/v1/..;/x",
            "/v1/%00",
        ] {
            assert!(normalize(p).is_err(), "{p}");
        }
    }

    #[test]
    fn session_prefix_sets_the_session_and_is_stripped() {
        let r = resolve("/s/run-42/v1/chat/completions").unwrap();
        assert_eq!(r.session.unwrap(), "run-42");
        assert_eq!(r.path, "/v1/chat/completions");
        let r = resolve("/s/a%40b").unwrap();
        assert_eq!(r.session.unwrap(), "a@b");
        assert_eq!(r.path, "/");
        let r = resolve("/v1/models").unwrap();
        assert_eq!(r.session, None);
    }

    #[test]
    fn profile_prefix_names_the_profile_and_is_stripped_before_a_session() {
        let r = resolve("/p/team-b/s/job-1/v1/models").unwrap();
        assert_eq!(r.profile, Some("team-b"));
        assert_eq!(r.session.unwrap(), "job-1");
        assert_eq!(r.path, "/v1/models");
        let r = resolve("/p/team-b/v1/models").unwrap();
        assert_eq!(
            (r.profile, r.session, &*r.path),
            (Some("team-b"), None, "/v1/models")
        );
        let r = resolve("/p/x").unwrap();
        assert_eq!((r.profile, &*r.path), (Some("x"), "/"));
        // The other way round, the same.
        let r = resolve("/s/j/p/x/v1").unwrap();
        assert_eq!((r.profile, &*r.path), (Some("x"), "/v1"));
        assert_eq!(r.session.unwrap(), "j");
        // One of each at most: a second `/p/` is the upstream's path.
        let r = resolve("/p/x/s/j/p/y/v1").unwrap();
        assert_eq!((r.profile, &*r.path), (Some("x"), "/p/y/v1"));
        assert_eq!(resolve("/v1/models").unwrap().profile, None);
        // The profile prefix cannot hide an escape either.
        assert!(resolve("/p/x/../../etc").is_err());
    }

    #[test]
    fn bad_session_ids_are_refused() {
        let long = format!("/s/{}/v1", "x".repeat(MAX_SESSION_ID + 1));
        for p in [
            "/s//v1",
            "/s/a%20b/v1",
            "/s/%C3%A9/v1",
            "/s/a%0Ab/v1",
            "/s/../v1",
            "/s/%2e/v1",
            long.as_str(),
        ] {
            assert!(resolve(p).is_err(), "{p}");
        }
        let max = format!("/s/{}/v1", "x".repeat(MAX_SESSION_ID));
        assert!(resolve(&max).is_ok());
    }

    #[test]
    fn session_prefix_cannot_hide_an_escape() {
        assert!(resolve("/s/x/../../etc").is_err());
        assert!(resolve("/s/x/%2e%2e/y").is_err());
    }

    #[test]
    fn non_path_targets_are_refused() {
        assert!(resolve("*").is_err());
    }
}
