//! Hostile bytes through the chunked body scanner, split at a fuzzed point:
//! never a panic, and the split must not change the outcome.
#![no_main]

use ktern::proxy::http::body::{BodyScanner, Framing};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else { return };
    let mut whole = BodyScanner::new(Framing::Chunked);
    let expect = whole.scan(input).map(|n| (n, whole.is_done()));
    let cut = (split as usize * input.len() / 256).min(input.len());
    let mut parts = BodyScanner::new(Framing::Chunked);
    let got = parts.scan(&input[..cut]).and_then(|a| {
        if parts.is_done() {
            return Ok((a, true));
        }
        parts.scan(&input[cut..]).map(|b| (a + b, parts.is_done()))
    });
    assert_eq!(got.is_ok(), expect.is_ok());
    if let (Ok(g), Ok(e)) = (got, expect) {
        assert_eq!(g, e);
    }
});
