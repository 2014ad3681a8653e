//! The driver against an in-memory rustls client, with no socket: the
//! one loop the unit tests (which hold bytes back), the handshake
//! benchmarks (which time the server's share) and `tests/handshake_cost.rs`
//! (which counts its allocations) share.

use std::time::{Duration, Instant};

use rustls::ClientConnection;

use super::{Established, Handshake, Step};

/// What is measured of the server's share of a handshake: every call into
/// the driver runs through [`Meter::server`], the client's work outside it.
pub trait Meter {
    /// Runs one call into the driver.
    fn server<R>(&mut self, call: impl FnOnce() -> R) -> R;
}

/// Measures nothing.
impl Meter for () {
    fn server<R>(&mut self, call: impl FnOnce() -> R) -> R {
        call()
    }
}

/// The time spent inside the driver's calls.
impl Meter for Duration {
    fn server<R>(&mut self, call: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = call();
        *self += t.elapsed();
        r
    }
}

/// Moves bytes between `client` and the driver until the driver is done
/// or waits for input the client has not produced; returns the last step.
/// `hold_back`: bytes of each client flight kept back (a flight split
/// across reads). `meter` measures the driver's calls.
///
/// Test and benchmark support: panics on any TLS error.
pub fn pump(
    client: &mut ClientConnection,
    hs: &mut Handshake,
    hold_back: usize,
    meter: &mut impl Meter,
) -> Step {
    loop {
        let mut to_server = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut to_server).expect("client flight");
        }
        let now = &to_server[..to_server.len().saturating_sub(hold_back)];
        let (step, out) = meter.server(|| {
            if !now.is_empty() {
                hs.handle_input(now).expect("server takes the flight");
            }
            let step = hs.poll().expect("server step");
            let out = (step == Step::Transmit).then(|| hs.take_output());
            (step, out)
        });
        match out {
            // `output_sent` only gives the buffer back for the next
            // flight: outside the meter, as the benchmarks always timed it.
            Some(out) => {
                deliver(client, &out);
                hs.output_sent(out);
            }
            None if now.is_empty() || hold_back > 0 => return step,
            None => {}
        }
    }
}

/// One whole handshake of `client` (naming `sni`) against a server for
/// `server`, in memory, from the driver's creation to `finish`, with
/// `meter` measuring the server's share; the connection as it is handed
/// on. The client has the tickets the server held (`Established::unsent`),
/// so a resuming client can resume with them next time.
pub fn handshake(
    server: &super::ServerTls,
    client: &std::sync::Arc<rustls::ClientConfig>,
    sni: &str,
    meter: &mut impl Meter,
) -> Established {
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("a DNS name");
    let mut c = ClientConnection::new(client.clone(), name).expect("client config");
    let mut hs = meter.server(|| Handshake::new(server).expect("server config"));
    let step = pump(&mut c, &mut hs, 0, meter);
    assert_eq!(step, Step::Done);
    let est = meter.server(|| hs.finish());
    deliver(&mut c, &est.unsent);
    est
}

/// [`handshake`], timed: the time spent inside the server driver. The
/// handshake benchmarks' unit of work.
pub fn timed_handshake(
    server: &super::ServerTls,
    client: &std::sync::Arc<rustls::ClientConfig>,
    sni: &str,
) -> Duration {
    let mut server_time = Duration::ZERO;
    std::hint::black_box(handshake(server, client, sni, &mut server_time));
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

/// A TLS 1.3 record of content type `typ` holding `payload`, sealed under
/// `client`'s traffic key at its next sequence number as rustls would
/// seal it: for tests that send what rustls' own API never writes (a
/// handshake message cut across records). The client must have finished
/// its handshake with `enable_secret_extraction` set; it is used up.
///
/// Test support: panics on anything else.
pub fn sealed_record(
    client: ClientConnection,
    typ: rustls::ContentType,
    payload: &[u8],
) -> Vec<u8> {
    sealed_records(client, &[(typ, payload)]).concat()
}

/// [`sealed_record`] for several records, at consecutive sequence numbers:
/// each record's bytes, to be sent together or apart.
pub fn sealed_records(
    client: ClientConnection,
    records: &[(rustls::ContentType, &[u8])],
) -> Vec<Vec<u8>> {
    use rustls::crypto::cipher::{OutboundChunks, OutboundPlainMessage};
    let Some(rustls::SupportedCipherSuite::Tls13(suite)) = client.negotiated_cipher_suite() else {
        panic!("a TLS 1.3 connection");
    };
    let secrets = client
        .dangerous_extract_secrets()
        .expect("extractable secrets");
    let (seq, (key, iv)) = match secrets.tx {
        (seq, rustls::ConnectionTrafficSecrets::Aes128Gcm { key, iv }) => (seq, (key, iv)),
        (seq, rustls::ConnectionTrafficSecrets::Aes256Gcm { key, iv }) => (seq, (key, iv)),
        (seq, rustls::ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv }) => (seq, (key, iv)),
        _ => panic!("a TLS 1.3 suite"),
    };
    let mut sealer = suite.aead_alg.encrypter(key, iv);
    (seq..)
        .zip(records)
        .map(|(seq, &(typ, payload))| {
            let message = OutboundPlainMessage {
                typ,
                version: rustls::ProtocolVersion::TLSv1_2,
                payload: OutboundChunks::Single(payload),
            };
            sealer.encrypt(message, seq).expect("sealed").encode()
        })
        .collect()
}
