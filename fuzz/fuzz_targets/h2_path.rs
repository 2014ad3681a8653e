//! What ktern itself parses on the HTTP/2 path, on hostile bytes split at
//! a fuzzed point: the frame watches (client frames in, ktern's frames
//! out), the chunked decoder that turns a backend body into DATA, and the
//! trailer section restated as HTTP/2 trailers. Never a panic; the split
//! never changes an outcome; decoding agrees with scanning.
#![no_main]

use ktern::proxy::h2::convert::trailers_from_h1;
use ktern::proxy::h2::watch::{FrameWatch, OutWatch};
use ktern::proxy::http::body::{BodyScanner, Decoded, Framing};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else { return };
    let cut = (split as usize * input.len() / 256).min(input.len());

    let mut whole = FrameWatch::new(u32::from(split));
    let verdict = whole.feed(input);
    let mut parts = FrameWatch::new(u32::from(split));
    parts.feed(&input[..cut]);
    assert_eq!(parts.feed(&input[cut..]), verdict);
    assert_eq!(parts.control_frames(), whole.control_frames());

    let mut out = OutWatch::default();
    let n = out.feed(input);
    let mut out = OutWatch::default();
    assert_eq!(out.feed(&input[..cut]) + out.feed(&input[cut..]), n);

    let mut scan = BodyScanner::new(Framing::Chunked);
    let scanned = scan.scan(input);
    let mut dec = BodyScanner::new(Framing::Chunked);
    let mut decoded = Decoded::default();
    let got = dec.decode(&input[..cut], &mut decoded).and_then(|a| {
        if dec.is_done() {
            return Ok(a);
        }
        dec.decode(&input[cut..], &mut decoded).map(|b| a + b)
    });
    assert_eq!(got.is_ok(), scanned.is_ok());
    if let (Ok(g), Ok(s)) = (&got, &scanned) {
        assert_eq!(g, s);
        assert!(decoded.data.len() + decoded.trailers.len() <= *g);
    }
    let _ = trailers_from_h1(input);
});
