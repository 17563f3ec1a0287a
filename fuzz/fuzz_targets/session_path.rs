//! The `/s/SESSION/` prefix and path rewriting (`proxy::path`, private), through a running proxy:
//! the input is the request target of `GET <input> HTTP/1.1` (CR and LF dropped, so it stays a
//! target: the `headers` target is the one that injects fields; a 0xff byte becomes the "evil"
//! listener's address).
//!
//! Invariants, for every request the upstream receives: the configured `Host`, a path under the
//! base path (after decoding and dot-segment removal), exactly one `Authorization` carrying the
//! agent's token; and the "evil" listener, which inputs may name, is never connected to.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let stack = behest_agent_fuzz::stack();
    let before = stack.seen();
    let mut req = b"GET ".to_vec();
    // Bytes the fuzzer can splice in to name the other listener.
    let evil = stack.evil.to_string();
    for &b in data {
        match b {
            0xff => req.extend_from_slice(evil.as_bytes()),
            b'\r' | b'\n' => {}
            b => req.push(b),
        }
    }
    req.extend_from_slice(
        format!(
            " HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            stack.host()
        )
        .as_bytes(),
    );
    let answer = stack.exchange(&req);
    assert!(
        !answer.starts_with(b"HTTP/1.1 5"),
        "the proxy answered 5xx: {}",
        String::from_utf8_lossy(&answer)
    );
    stack.assert_invariants(before, None);
});
