//! Hostile bytes into the sans-IO handshake driver, split at arbitrary
//! points: it must never panic, whatever rustls makes of them.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn config() -> ktern::handshake::ServerTls {
    static CONFIG: OnceLock<ktern::handshake::ServerTls> = OnceLock::new();
    CONFIG.get_or_init(|| ktern::handshake::self_signed_config().expect("config")).clone()
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let mut hs = ktern::handshake::Handshake::new(&config()).expect("config is valid");
    let cut = (split as usize * rest.len() / 256).min(rest.len());
    for chunk in [&rest[..cut], &rest[cut..], &[][..]] {
        if hs.handle_input(chunk).is_err() {
            return;
        }
        loop {
            match hs.poll() {
                Ok(ktern::handshake::Step::Transmit) => {
                    let out = hs.take_output();
                    hs.output_sent(out);
                }
                Ok(_) => break,
                Err(_) => return,
            }
        }
    }
});
