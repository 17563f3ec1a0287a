//! Header rewriting (`proxy::forward`, private), through a running proxy: the input is spliced
//! into a request head after credentials the client sends (`Authorization`,
//! `Proxy-Authorization`, in a case the input picks), so it can add any fields, `Connection`
//! lists, duplicates, or a body.
//!
//! Invariants, for every request the upstream receives: exactly one `Authorization`, carrying the
//! agent's token (it verifies, for the agent's client id); no `Proxy-Authorization`; the client's
//! credential value nowhere; the configured `Host`; never both `Content-Length` and
//! `Transfer-Encoding`. The head always ends with `Content-Length: 5`, so an input that adds a
//! `Transfer-Encoding` field makes conflicting framing: it is read as chunked or refused (SPEC §4),
//! never answered 5xx.

#![no_main]

use libfuzzer_sys::fuzz_target;

/// The client's credential; inputs that contain it are skipped (they may legitimately send it in
/// another field).
const MARKER: &str = "cliCredMarker7f3a";

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    if text
        .to_ascii_lowercase()
        .contains(&MARKER.to_ascii_lowercase())
    {
        return;
    }
    let stack = behest_agent_fuzz::stack();
    let before = stack.seen();
    let case = |name: &str| -> String {
        name.chars()
            .enumerate()
            .map(|(i, c)| {
                if flags >> (i % 8) & 1 != 0 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect()
    };
    // A GET to a route that ignores the body, whose 5-byte body is also a complete chunked body,
    // so that a request read either way is answered 200 unless the proxy refuses it.
    let mut head = format!(
        "GET /s/fuzz/v1/models HTTP/1.1\r\nHost: {}\r\n",
        stack.host()
    );
    head.push_str(&format!("{}: Bearer {MARKER}\r\n", case("authorization")));
    if flags & 0x80 != 0 {
        head.push_str(&format!(
            "{}: Basic {MARKER}\r\n",
            case("proxy-authorization")
        ));
    }
    head.push_str(&text);
    head.push_str("\r\nConnection: close\r\nContent-Length: 5\r\n\r\n0\r\n\r\n");
    let answer = stack.exchange(head.as_bytes());
    assert!(
        !answer.starts_with(b"HTTP/1.1 5"),
        "the proxy answered 5xx: {}",
        String::from_utf8_lossy(&answer)
    );
    stack.assert_invariants(before, Some(MARKER));
});
