//! Hostile bytes through the ClientHello peek: never a panic; a parsed
//! hello is unchanged by bytes after it, and a prefix of it either needs
//! more input or already holds the same whole hello; and the hello cut
//! into other records reads the same (the passthrough peek's case), also
//! when the incremental peek is fed it a piece at a time.
#![no_main]

use ktern::handshake::hello::{peek, HelloPeek, Peeked};
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
        // The same handshake bytes cut into records of another size (1 to
        // 16 bytes each, as a passthrough client may send them) read the
        // same.
        let mut payload = Vec::new();
        let mut rest = input;
        while rest.len() >= 5 && rest[0] == 22 {
            let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
            let Some(fragment) = rest.get(5..5 + len) else { break };
            payload.extend_from_slice(fragment);
            rest = &rest[5 + len..];
        }
        let size = 1 + usize::from(split % 16);
        let mut resplit = Vec::new();
        for part in payload.chunks(size) {
            resplit.extend_from_slice(&[22, 3, 1, 0, part.len() as u8]);
            resplit.extend_from_slice(part);
        }
        assert_eq!(peek(&resplit), whole);
        // Fed in pieces of `size` bytes, as reads would bring them.
        let mut fed = HelloPeek::default();
        let mut last = Peeked::NeedMore;
        for end in (size..resplit.len()).step_by(size).chain([resplit.len()]) {
            last = fed.feed(&resplit[..end]);
            if last != Peeked::NeedMore {
                break;
            }
        }
        assert_eq!(last, whole);
    }
});
