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
    // Holding the trailer section back (a backend's, filtered on its way
    // to an HTTP/1.1 client) uses the same bytes, split or not, and
    // forwards all of them but the section's.
    let mut held = None;
    let mut holding = BodyScanner::new(Framing::Chunked);
    let mut used = 0;
    let mut forwarded = 0;
    let mut res = Ok(());
    for part in [&input[..cut], &input[cut..]] {
        if holding.is_done() {
            break;
        }
        let in_section = held.is_some();
        match holding.scan_holding_trailers(part, &mut held) {
            Ok((f, u)) => {
                assert!(f <= u && u <= part.len());
                // Once the section has begun, nothing more is forwarded.
                assert!(!in_section || f == 0);
                forwarded += f;
                used += u;
            }
            Err(e) => {
                res = Err(e);
                break;
            }
        }
    }
    assert_eq!(res.is_ok(), expect.is_ok());
    if let Ok((n, done)) = expect {
        assert_eq!((used, holding.is_done()), (n, done));
        let section = held.map_or(0, |h| h.trailers.len());
        assert_eq!(forwarded + section, used);
    }
});
