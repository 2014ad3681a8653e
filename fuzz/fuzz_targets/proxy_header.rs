//! Hostile PROXY protocol headers (v1 text, v2 binary): the verdict never
//! panics; a complete header never claims more bytes than arrived and
//! reads the same alone; a v1 line that has ended is never "need more".
#![no_main]

use ktern::shard::proxy_header::{parse, Verdict, MAX_HEADER};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let verdict = parse(data);
    if let Verdict::Done { len, addresses } = &verdict {
        assert!(*len <= data.len() && *len <= MAX_HEADER);
        assert_eq!(
            parse(&data[..*len]),
            Verdict::Done {
                len: *len,
                addresses: *addresses
            }
        );
    }
    let line_ended = data.starts_with(b"PROXY")
        && data[..data.len().min(107)].windows(2).any(|w| w == b"\r\n");
    assert!(!(line_ended && verdict == Verdict::NeedMore), "an ended v1 line waits");
});
