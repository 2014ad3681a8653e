//! Hostile bytes through the ClientHello peek: never a panic; a parsed
//! hello is unchanged by bytes after it, and a prefix of it either needs
//! more input or already holds the same whole hello.
#![no_main]

use ktern::handshake::hello::{peek, Peeked};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else { return };
    let whole = peek(input);
    if let Peeked::Hello(h) = &whole {
        let cut = split as usize * input.len() / 256;
        match peek(&input[..cut]) {
            Peeked::NeedMore => {}
            Peeked::Hello(p) => assert_eq!(&p, h),
            Peeked::NotHello => panic!("a prefix of a hello was refused"),
        }
        let mut more = input.to_vec();
        more.extend_from_slice(b"\x17\x03\x03\x00\x01x");
        assert_eq!(peek(&more), whole);
        if let Some(sni) = &h.sni {
            assert!(sni.bytes().all(|b| !b.is_ascii_uppercase()));
        }
    }
});
