//! The driver against an in-memory rustls client, with no socket: the
//! one loop the unit tests (which hold bytes back) and the handshake
//! benchmark (which times the server's share) share.

use std::time::{Duration, Instant};

use rustls::ClientConnection;

use super::{Handshake, Step};

/// Moves bytes between `client` and the driver until the driver is done
/// or waits for input the client has not produced; returns the last step.
/// `hold_back`: bytes of each client flight kept back (a flight split
/// across reads). `server_time` accumulates the time spent inside the
/// driver's calls.
///
/// Test and benchmark support: panics on any TLS error.
pub fn pump(
    client: &mut ClientConnection,
    hs: &mut Handshake,
    hold_back: usize,
    server_time: &mut Duration,
) -> Step {
    loop {
        let mut to_server = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut to_server).expect("client flight");
        }
        let now = &to_server[..to_server.len().saturating_sub(hold_back)];
        let t = Instant::now();
        if !now.is_empty() {
            hs.handle_input(now).expect("server takes the flight");
        }
        let step = hs.poll().expect("server step");
        let out = (step == Step::Transmit).then(|| hs.take_output());
        *server_time += t.elapsed();
        match out {
            Some(out) => {
                deliver(client, &out);
                hs.output_sent(out);
            }
            None if now.is_empty() || hold_back > 0 => return step,
            None => {}
        }
    }
}

/// One full handshake of `client` (naming `sni`) against a server for
/// `server`, in memory; the time spent inside the server driver. The
/// handshake benchmarks' unit of work.
pub fn timed_handshake(
    server: &super::ServerTls,
    client: &std::sync::Arc<rustls::ClientConfig>,
    sni: &str,
) -> Duration {
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("a DNS name");
    let mut c = ClientConnection::new(client.clone(), name).expect("client config");
    let t = Instant::now();
    let mut hs = Handshake::new(server).expect("server config");
    let mut server_time = t.elapsed();
    let step = pump(&mut c, &mut hs, 0, &mut server_time);
    assert_eq!(step, Step::Done);
    let t = Instant::now();
    let est = std::hint::black_box(hs.finish());
    let server_time = server_time + t.elapsed();
    // The held tickets, as the first record would carry them: a resuming
    // client keeps them for its next handshake.
    deliver(&mut c, &est.unsent);
    server_time
}

/// Hands the server's `bytes` to `client`.
///
/// Test and benchmark support: panics on any TLS error.
pub fn deliver(client: &mut ClientConnection, bytes: &[u8]) {
    let mut rd: &[u8] = bytes;
    while !rd.is_empty() {
        client.read_tls(&mut rd).expect("client reads");
    }
    client.process_new_packets().expect("client processes");
}
