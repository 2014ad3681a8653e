//! Hostile bytes as an HTTP/1.1 request head, then as a response head, then
//! through the forwarding rewrite: refusals are fine, panics are not, and an
//! accepted head must re-parse to the same framing after rewriting.
#![no_main]

use ktern::proxy::http::{head, rewrite};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = head::Limits::default();
    if let Ok(Some(req)) = head::parse_request(data, &limits) {
        let fwd = rewrite::Forwarding {
            client: std::net::SocketAddr::from(([192, 0, 2, 1], 1234)),
            trusted: data.len() % 2 == 0,
            x_forwarded: true,
            forwarded: true,
        };
        let mut out = Vec::new();
        rewrite::request(&req, &fwd, &mut out);
        // What we send upstream must be framed exactly as what we accepted.
        // The rewrite adds up to five fields and some bytes; allow for them.
        let relaxed = head::Limits { head: 1 << 20, headers: limits.headers + 8, ..limits };
        match head::parse_request(&out, &relaxed) {
            Ok(Some(again)) => assert_eq!(again.framing, req.framing),
            other => panic!("rewritten head does not parse: {other:?}\n{}", String::from_utf8_lossy(&out)),
        }
    }
    let _ = head::parse_response(data, "GET", 16 << 10);
});
