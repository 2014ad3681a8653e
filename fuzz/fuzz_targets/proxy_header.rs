//! Hostile PROXY protocol headers (v1 text, v2 binary): the verdict never
//! panics, and a complete header never claims more bytes than arrived.
#![no_main]

use ktern::shard::proxy_header::{parse, Verdict, MAX_HEADER};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Verdict::Done { len, .. } => assert!(len <= data.len() && len <= MAX_HEADER),
        Verdict::NeedMore => assert!(data.len() < MAX_HEADER),
        Verdict::Bad(_) => {}
    }
});
