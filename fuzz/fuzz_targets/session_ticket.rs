//! Hostile session tickets: a client may present any bytes as a ticket.
//! Opening them must never panic and never succeed unless they were
//! sealed with the key (any forgery would be an authentication bypass);
//! what was sealed opens to the same bytes.
#![no_main]

use std::sync::OnceLock;

use ktern::handshake::tickets::TicketKeys;
use libfuzzer_sys::fuzz_target;

fn keys() -> &'static TicketKeys {
    static KEYS: OnceLock<TicketKeys> = OnceLock::new();
    KEYS.get_or_init(|| TicketKeys::fleet(&[7u8; 32], 3600).expect("32-byte secret"))
}

fuzz_target!(|data: &[u8]| {
    let now = 1_800_000_000;
    assert!(keys().open_at(b"l", data, now).is_none(), "a forged ticket opened");
    let sealed = keys().seal_at(b"l", data, now).expect("sealing works");
    assert_eq!(keys().open_at(b"l", &sealed, now).as_deref(), Some(data));
});
