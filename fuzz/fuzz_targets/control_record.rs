//! Post-handshake control records (what the kernel hands over with a record
//! type under kTLS): classification must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&rtype, body)) = data.split_first() {
        let _ = ktern::ktls::record::classify(rtype, body, true);
        let _ = ktern::ktls::record::classify(rtype, body, false);
    }
});
