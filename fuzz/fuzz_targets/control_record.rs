//! Post-handshake control records (what the kernel hands over with a record
//! type under kTLS, on either end): classification and NewSessionTicket
//! splitting must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&rtype, body)) = data.split_first() {
        for (tls13, from_server) in [(true, false), (false, false), (true, true)] {
            let _ = ktern::ktls::record::classify(rtype, body, tls13, from_server);
        }
        // A backend's NewSessionTicket record, split into its messages:
        // every payload lies inside the body.
        if let Some(tickets) = ktern::ktls::record::session_tickets(body) {
            assert!(tickets.iter().map(|t| t.len() + 4).sum::<usize>() == body.len());
        }
    }
});
