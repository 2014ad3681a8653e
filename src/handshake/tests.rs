//! The sans-IO driver against an in-memory rustls client: no sockets.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::ClientConnection;

use super::*;
use crate::config::{Certificate, Listener, TlsVersions};

fn listener(tls12: bool, tls13: bool) -> (Listener, CertificateDer<'static>) {
    let (cert_pem, key_pem) = crate::builtin::self_signed(&["localhost"]).unwrap();
    let cert = Certificate::from_pem(&cert_pem, &key_pem).unwrap();
    let root = cert.key.cert[0].clone();
    (
        Listener::standalone("t", cert, TlsVersions { tls12, tls13 }),
        root,
    )
}

fn client(root: CertificateDer<'static>, tls12_only: bool) -> ClientConnection {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(crypto_provider()));
    let builder = if tls12_only {
        builder.with_protocol_versions(&[&rustls::version::TLS12])
    } else {
        builder.with_safe_default_protocol_versions()
    };
    let cfg = builder
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap()).unwrap()
}

/// A handshake for `l` with a store of its own certificates.
fn start(l: &Listener) -> Handshake {
    Handshake::new(&server_config(l, &cert_store(l), &ticketer()).unwrap()).unwrap()
}

/// The client's first flight (its ClientHello).
fn client_hello(c: &mut ClientConnection) -> Vec<u8> {
    let mut hello = Vec::new();
    c.write_tls(&mut hello).unwrap();
    hello
}

#[test]
fn strict_sni_refuses_unknown_names_with_unrecognized_name() {
    let (mut l, root) = listener(true, true);
    l.strict_sni = true;
    l.certificates[0].server_names = vec!["*.example.com".into()];
    // `localhost` matches nothing: refused before rustls answers.
    let mut hs = start(&l);
    let hello = client_hello(&mut client(root.clone(), false));
    let err = hs.handle_input(&hello).unwrap_err();
    assert!(
        matches!(&err, HandshakeError::UnknownName(Some(n)) if &**n == "localhost"),
        "{err:?}"
    );
    assert_eq!(hs.pending_output(), &UNRECOGNIZED_NAME);
    // The same hello is served once the name is known.
    l.certificates[0].server_names.push("localhost".into());
    let mut hs = start(&l);
    let mut c = client(root, false);
    assert_eq!(pump(&mut c, &mut hs, 0), Step::Done);
}

/// The shared in-memory pump, measuring nothing.
fn pump(c: &mut ClientConnection, hs: &mut Handshake, hold_back: usize) -> Step {
    super::memory::pump(c, hs, hold_back, &mut ())
}

fn complete(tls12_only: bool) {
    let (l, root) = listener(true, true);
    let mut hs = start(&l);
    let mut c = client(root, tls12_only);
    let step = pump(&mut c, &mut hs, 0);
    assert_eq!(step, Step::Done, "tls12_only={tls12_only}");
    assert!(!c.is_handshaking());
    assert_eq!(hs.sni(), Some("localhost"));
    let est = hs.finish();
    assert!(est.early_plaintext.is_empty());
    assert_eq!(est.sni.as_deref(), Some("localhost"));
    // The client's Finished came alone: TLS 1.3's tickets went out at
    // once, as TLS 1.2's last flight always does.
    assert!(est.unsent.is_empty(), "tls12_only={tls12_only}");
    let want = if tls12_only {
        rustls::ProtocolVersion::TLSv1_2
    } else {
        rustls::ProtocolVersion::TLSv1_3
    };
    assert_eq!(est.conn.protocol_version(), Some(want));
    let (secrets, _kernel) = est.conn.dangerous_into_kernel_connection().unwrap();
    // No application record was opened in userspace. In TLS 1.2 the
    // client's Finished is the first record under the traffic key (seq 0);
    // TLS 1.3 uses separate handshake keys, so its traffic seq starts at 0.
    assert_eq!(secrets.rx.0, u64::from(tls12_only));
}

#[test]
fn completes_tls13_and_hands_over_keys() {
    complete(false);
}

#[test]
fn completes_tls12_and_hands_over_keys() {
    complete(true);
}

/// A TLS 1.3 client whose secrets can be extracted, to seal records of
/// its own (`memory::sealed_record`).
fn extracting_client(root: CertificateDer<'static>) -> ClientConnection {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(crypto_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.enable_secret_extraction = true;
    ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap()).unwrap()
}

/// A TLS 1.3 handshake given the client's Finished and, in the same read,
/// the first record under its traffic key: `payload` as content `typ`,
/// sealed as rustls would (to send what its API never writes).
fn after_the_finished(typ: rustls::ContentType, payload: &[u8]) -> Handshake {
    let (l, root) = listener(false, true);
    let mut hs = start(&l);
    let mut c = extracting_client(root);
    until_the_clients_finished(&mut hs, &mut c);
    let mut flight = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut flight).unwrap();
    }
    flight.extend(super::memory::sealed_record(c, typ, payload));
    hs.handle_input(&flight).unwrap();
    hs
}

/// Runs the handshake until the server waits for the client's Finished,
/// which the client holds, not yet written.
fn until_the_clients_finished(hs: &mut Handshake, c: &mut ClientConnection) {
    let mut step = hs.poll().unwrap();
    loop {
        match step {
            Step::Transmit => {
                let out = hs.take_output();
                super::memory::deliver(c, &out);
                hs.output_sent(out);
            }
            Step::Read(None) => {
                if !c.is_handshaking() {
                    return;
                }
                let mut buf = Vec::new();
                while c.wants_write() {
                    c.write_tls(&mut buf).unwrap();
                }
                hs.handle_input(&buf).unwrap();
            }
            other => panic!("unexpected {other:?}"),
        }
        step = hs.poll().unwrap();
    }
}

#[test]
fn data_sent_with_the_final_flight_is_decrypted_not_lost() {
    let (l, root) = listener(true, true);
    let mut hs = start(&l);
    let mut c = client(root, false);
    until_the_clients_finished(&mut hs, &mut c);
    // Client Finished plus two application records in one "segment", the
    // last one cut short: the driver must ask for exactly the missing bytes.
    c.writer().write_all(b"first record").unwrap();
    let mut flight = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut flight).unwrap();
    }
    c.writer().write_all(b"second").unwrap();
    let mut second = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut second).unwrap();
    }
    flight.extend_from_slice(&second[..7]);
    hs.handle_input(&flight).unwrap();
    let mut step = hs.poll().unwrap();
    while step == Step::Transmit {
        let out = hs.take_output();
        hs.output_sent(out);
        step = hs.poll().unwrap();
    }
    assert_eq!(step, Step::Read(Some(second.len() - 7)));
    hs.handle_input(&second[7..]).unwrap();
    assert_eq!(hs.poll().unwrap(), Step::Done);
    let est = hs.finish();
    assert_eq!(est.early_plaintext, b"first recordsecond");
    // The client's first bytes came with its Finished: the tickets were
    // held for ktern's first record, sealed in order, and the client
    // takes them when they come.
    assert!(!est.unsent.is_empty());
    let mut held_records = 0;
    let mut rest: &[u8] = &est.unsent;
    while rest.len() >= 5 {
        rest = &rest[5 + usize::from(u16::from_be_bytes([rest[3], rest[4]]))..];
        held_records += 1;
    }
    assert!(rest.is_empty(), "whole records only");
    super::memory::deliver(&mut c, &est.unsent);
    let (secrets, _) = est.conn.dangerous_into_kernel_connection().unwrap();
    // Two records were opened in userspace; the kernel must start at seq 2,
    // and send after the held tickets.
    assert_eq!(secrets.rx.0, 2);
    // The held tickets were sealed first: the kernel's first record
    // follows the last of them.
    assert!(secrets.tx.0 >= 1);
    assert_eq!(secrets.tx.0, held_records);
    let _ = c.reader().read(&mut [0u8; 1]);
}

#[test]
fn garbage_instead_of_client_hello_fails_with_an_alert() {
    let (l, _) = listener(true, true);
    let mut hs = start(&l);
    hs.handle_input(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let err = hs.poll().unwrap_err();
    assert!(matches!(err, HandshakeError::Tls(_)), "{err:?}");
    let alert = hs.pending_output();
    assert_eq!(
        alert.first(),
        Some(&21),
        "a fatal alert record is queued: {alert:?}"
    );
}

#[test]
fn eof_mid_handshake_is_reported() {
    let (l, _) = listener(true, true);
    let mut hs = start(&l);
    hs.handle_input(&[22, 3, 1, 0, 200, 1]).unwrap();
    assert_eq!(hs.poll().unwrap(), Step::Read(None));
    hs.handle_input(&[]).unwrap();
    assert!(matches!(hs.poll(), Err(HandshakeError::Eof)));
}

#[test]
fn oversized_input_is_refused() {
    let (l, _) = listener(true, true);
    let mut hs = start(&l);
    let big = vec![0u8; MAX_INPUT + 1];
    assert!(matches!(
        hs.handle_input(&big),
        Err(HandshakeError::TooLarge)
    ));
}

#[test]
fn partial_record_arithmetic() {
    assert_eq!(partial_record_remaining(&[]), 0);
    assert_eq!(partial_record_remaining(&[23, 3]), 3);
    assert_eq!(partial_record_remaining(&[23, 3, 3, 0, 10, 1, 2]), 8);
    assert_eq!(partial_record_remaining(&[23, 3, 3, 0, 1, 9]), 0);
}

#[test]
fn complete_records_counts_whole_records_only() {
    let record = |len: u16| {
        let mut r = vec![23, 3, 3];
        r.extend_from_slice(&len.to_be_bytes());
        r.resize(5 + usize::from(len), 0);
        r
    };
    assert_eq!(complete_records(&[]), 0);
    assert_eq!(complete_records(&record(0)), 1);
    let two = [record(30), record(17)].concat();
    assert_eq!(complete_records(&two), 2);
    assert_eq!(
        complete_records(&two[..two.len() - 1]),
        1,
        "the second cut short"
    );
    assert_eq!(complete_records(&two[..3]), 0, "half a header");
}

#[test]
fn fuzz_regression_partial_handshake_message_then_garbage() {
    // Found by fuzz/fuzz_targets/handshake.rs: a handshake record holding a
    // partial message, then a bad record. rustls keeps progress into the
    // input buffer; collecting the alert with any other buffer panicked
    // inside rustls ("range start index 7 out of range").
    let crash = [
        0x16, 0x03, 0x00, 0x00, 0x02, 0x00, 0x00, 0xdb, 0xdb, 0xdb, 0xdb, 0xdb, 0xdb, 0xdb, 0x00,
        0x00, 0x00, 0x00,
    ];
    for cut in 0..crash.len() {
        let (l, _) = listener(true, true);
        let mut hs = start(&l);
        let mut failed = false;
        for chunk in [&crash[..cut], &crash[cut..], &[][..]] {
            if failed || hs.handle_input(chunk).is_err() {
                break;
            }
            loop {
                match hs.poll() {
                    Ok(Step::Transmit) => {
                        let out = hs.take_output();
                        hs.output_sent(out);
                    }
                    Ok(_) => break,
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
        }
        assert!(failed, "cut {cut}: garbage must fail the handshake");
    }
}

#[cfg(feature = "aws-lc-rs")]
#[test]
fn default_provider_offers_x25519mlkem768_first_and_negotiates_it() {
    let provider = crypto_provider();
    assert_eq!(
        provider.kx_groups[0].name(),
        rustls::NamedGroup::X25519MLKEM768
    );
    let (l, root) = listener(true, true);
    let mut hs = start(&l);
    let mut c = client(root, false);
    assert_eq!(pump(&mut c, &mut hs, 0), Step::Done);
    assert_eq!(
        c.negotiated_key_exchange_group().map(|g| g.name()),
        Some(rustls::NamedGroup::X25519MLKEM768)
    );
}

#[test]
fn sni_is_read_when_the_hello_arrives_a_byte_at_a_time() {
    let (l, root) = listener(true, true);
    let mut hs = start(&l);
    let mut c = client(root, false);
    let mut hello = Vec::new();
    c.write_tls(&mut hello).unwrap();
    for b in hello.chunks(1) {
        assert_eq!(hs.sni(), None);
        hs.handle_input(b).unwrap();
    }
    assert_eq!(hs.sni(), Some("localhost"));
    assert_eq!(hs.poll().unwrap(), Step::Transmit);
}

/// A ClientHello that never completes, read a little at a time, is held
/// in the handshake's input, whose capacity stops at its cap, and in the
/// peek's joined fragments, which stop at the message's length. (A second
/// copy of the input was kept, and each grew by doubling: about 350 KiB
/// held for 82 KiB sent.)
#[test]
fn a_slow_hello_is_held_within_its_caps() {
    use super::hello::MAX_HELLO;
    let (l, _root) = listener(true, true);
    // A ClientHello (type 1) whose header claims MAX_HELLO bytes.
    let mut msg = vec![1];
    msg.extend_from_slice(&(MAX_HELLO as u32).to_be_bytes()[1..]);
    msg.resize(4 + MAX_HELLO, 0);
    let records = |fragments: &mut dyn Iterator<Item = &[u8]>| {
        let mut wire = Vec::new();
        for fragment in fragments {
            wire.extend_from_slice(&[22, 3, 1]);
            wire.extend_from_slice(&(fragment.len() as u16).to_be_bytes());
            wire.extend_from_slice(fragment);
        }
        wire
    };
    // In 1-byte records, up to the input's cap.
    let mut hs = start(&l);
    let wire = records(&mut msg.chunks(1));
    for read in wire[..MAX_INPUT].chunks(1000) {
        hs.handle_input(read).unwrap();
    }
    assert_eq!(hs.poll().unwrap(), Step::Read(None), "the peek waits");
    assert!(
        hs.input.capacity() <= MAX_INPUT,
        "input: {} bytes held for {MAX_INPUT}",
        hs.input.capacity()
    );
    // In full records, all but the message's last two bytes.
    let mut hs = start(&l);
    let wire = records(&mut msg[..msg.len() - 2].chunks(1 << 14));
    for read in wire.chunks(1000) {
        hs.handle_input(read).unwrap();
    }
    assert_eq!(hs.poll().unwrap(), Step::Read(None), "the peek waits");
    assert!(
        hs.hello_peek.held() <= msg.len(),
        "joined: {} bytes held for a message of {}",
        hs.hello_peek.held(),
        msg.len()
    );
    // The rest completes it, and the peek judges it.
    hs.handle_input(&records(&mut [&msg[msg.len() - 2..]].into_iter()))
        .unwrap();
    assert!(hs.hello_seen);
}

/// A client offering `alpn`, trusting `root`, naming `localhost`.
fn client_alpn(root: CertificateDer<'static>, alpn: &[&[u8]]) -> ClientConnection {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(crypto_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap()).unwrap()
}

#[test]
fn acme_tls_alpn_hellos_get_the_challenge_certificate_and_others_the_listeners() {
    // The standalone listener offers no ALPN: acme-tls/1 must not leak
    // into its list (clients offering h2 would get no_application_protocol).
    let (l, root) = listener(true, true);
    assert!(l.alpn.is_empty());
    let challenges = Arc::new(crate::challenges::Challenges::default());
    let (cpem, kpem) = crate::builtin::self_signed(&["localhost"]).unwrap();
    let answer = Certificate::from_pem(&cpem, &kpem).unwrap().key;
    challenges.put_tls_alpn("localhost", answer.clone());
    let mut tls = server_config(&l, &cert_store(&l), &ticketer()).unwrap();
    tls.acme = Some(acme_config(&l, &challenges).unwrap());

    let mut v = client_alpn(answer.cert[0].clone(), &[b"acme-tls/1"]);
    let mut hs = Handshake::new(&tls).unwrap();
    assert_eq!(pump(&mut v, &mut hs, 0), Step::Done);
    assert_eq!(v.alpn_protocol(), Some(&b"acme-tls/1"[..]));
    assert_eq!(v.peer_certificates().unwrap()[0], answer.cert[0]);

    let mut c = client_alpn(root.clone(), &[b"h2", b"http/1.1"]);
    let mut hs = Handshake::new(&tls).unwrap();
    assert_eq!(pump(&mut c, &mut hs, 0), Step::Done);
    assert_eq!(c.alpn_protocol(), None);
    assert_eq!(c.peer_certificates().unwrap()[0], root);

    // The validator's hello a byte at a time (rustls gets none of it
    // until the peek has the whole hello): still the challenge config.
    let mut v = client_alpn(answer.cert[0].clone(), &[b"acme-tls/1"]);
    let mut hs = Handshake::new(&tls).unwrap();
    let mut hello = Vec::new();
    v.write_tls(&mut hello).unwrap();
    for b in &hello {
        hs.handle_input(std::slice::from_ref(b)).unwrap();
        if !matches!(hs.poll().unwrap(), Step::Read(_)) {
            break;
        }
    }
    assert_eq!(pump(&mut v, &mut hs, 0), Step::Done);
    assert_eq!(v.peer_certificates().unwrap()[0], answer.cert[0]);
    assert!(hs.finish().acme_validation);

    // No answer published for the name: the validation fails.
    challenges.remove("localhost", "-");
    let mut v = client_alpn(answer.cert[0].clone(), &[b"acme-tls/1"]);
    let mut hs = Handshake::new(&tls).unwrap();
    let mut hello = Vec::new();
    v.write_tls(&mut hello).unwrap();
    hs.handle_input(&hello).unwrap();
    assert!(hs.poll().is_err());
}

/// A client ticket store that counts the TLS 1.3 tickets it is given.
#[derive(Debug)]
struct CountingStore {
    inner: rustls::client::ClientSessionMemoryCache,
    tickets: std::sync::atomic::AtomicUsize,
}

impl rustls::client::ClientSessionStore for CountingStore {
    fn set_kx_hint(&self, name: ServerName<'static>, group: rustls::NamedGroup) {
        self.inner.set_kx_hint(name, group)
    }
    fn kx_hint(&self, name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(name)
    }
    fn set_tls12_session(
        &self,
        name: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.inner.set_tls12_session(name, value)
    }
    fn tls12_session(
        &self,
        name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner.tls12_session(name)
    }
    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        self.inner.remove_tls12_session(name)
    }
    fn insert_tls13_ticket(
        &self,
        name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.tickets
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.insert_tls13_ticket(name, value)
    }
    fn take_tls13_ticket(
        &self,
        name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(name)
    }
}

#[test]
fn a_resuming_client_gets_one_new_ticket_and_a_full_handshake_two() {
    let (l, root) = listener(false, true);
    let tls = server_config(&l, &cert_store(&l), &ticketer()).unwrap();
    let store = Arc::new(CountingStore {
        inner: rustls::client::ClientSessionMemoryCache::new(8),
        tickets: Default::default(),
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(crypto_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::store(store.clone());
    let cfg = Arc::new(cfg);
    let tickets = || store.tickets.load(std::sync::atomic::Ordering::SeqCst);
    let mut kinds = Vec::new();
    let mut counts = Vec::new();
    for _ in 0..3 {
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = ClientConnection::new(cfg.clone(), name).unwrap();
        // The peek sees the offered ticket (pre_shared_key) from the
        // second hello on.
        let hello = client_hello(&mut c);
        let offered = match hello::peek(&hello) {
            hello::Peeked::Hello(h) => h.psk,
            p => panic!("{p:?}"),
        };
        let mut hs = Handshake::new(&tls).unwrap();
        hs.handle_input(&hello).unwrap();
        assert_eq!(pump(&mut c, &mut hs, 0), Step::Done);
        let est = hs.finish();
        super::memory::deliver(&mut c, &est.unsent);
        let server = est.conn.handshake_kind();
        kinds.push((offered, c.handshake_kind(), server));
        counts.push(tickets());
    }
    use rustls::HandshakeKind::{Full, Resumed};
    assert_eq!(
        kinds,
        [
            (false, Some(Full), Some(Full)),
            (true, Some(Resumed), Some(Resumed)),
            (true, Some(Resumed), Some(Resumed))
        ]
    );
    assert_eq!(counts, [2, 3, 4], "tickets received after each handshake");
}

/// The suite a handshake with `l` settles on, for a client whose suites
/// are its provider's with `first` moved to the front (TLS 1.2 only, or
/// its safe default versions), and whether it resumed: `resume` runs a
/// first handshake for a ticket, then the measured one offering it.
fn negotiated(
    l: &Listener,
    first: rustls::CipherSuite,
    tls12_only: bool,
    resume: bool,
) -> (rustls::CipherSuite, Option<rustls::HandshakeKind>) {
    let tls = server_config(l, &cert_store(l), &ticketer()).unwrap();
    let mut provider = crypto_provider();
    provider.cipher_suites.sort_by_key(|s| s.suite() != first);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(l.certificates[0].key.cert[0].clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider));
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let cfg = Arc::new(
        builder
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let mut last = None;
    for _ in 0..(1 + usize::from(resume)) {
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = ClientConnection::new(cfg.clone(), name).unwrap();
        let mut hs = Handshake::new(&tls).unwrap();
        assert_eq!(pump(&mut c, &mut hs, 0), Step::Done);
        let est = hs.finish();
        super::memory::deliver(&mut c, &est.unsent);
        let server = est.conn.negotiated_cipher_suite().map(|s| s.suite());
        let client = c.negotiated_cipher_suite().map(|s| s.suite());
        assert_eq!(server, client);
        last = Some((client.unwrap(), est.conn.handshake_kind()));
    }
    last.unwrap()
}

#[test]
fn the_servers_suite_order_decides_except_for_clients_that_put_chacha20_first() {
    use rustls::CipherSuite::*;
    use rustls::HandshakeKind::{Full, Resumed};
    let (mut l, _) = listener(true, true);
    // AES-256-GCM first (rustls' and OpenSSL's own order): AES-128-GCM,
    // the server's first, in both versions.
    let aes256 = TLS13_AES_256_GCM_SHA384;
    let aes256_12 = TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384;
    assert_eq!(
        negotiated(&l, aes256, false, false),
        (TLS13_AES_128_GCM_SHA256, Some(Full))
    );
    assert_eq!(
        negotiated(&l, aes256_12, true, false).0,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
    );
    // ChaCha20 first: the client's choice, resumed too.
    let chacha = TLS13_CHACHA20_POLY1305_SHA256;
    let chacha12 = TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256;
    assert_eq!(negotiated(&l, chacha, false, false), (chacha, Some(Full)));
    assert_eq!(negotiated(&l, chacha, false, true), (chacha, Some(Resumed)));
    assert_eq!(negotiated(&l, chacha12, true, false).0, chacha12);
    assert_eq!(
        negotiated(&l, aes256, false, true),
        (TLS13_AES_128_GCM_SHA256, Some(Resumed))
    );
    // A listener's own list is its order.
    l.cipher_suites = vec![aes256, chacha, TLS13_AES_128_GCM_SHA256, aes256_12];
    assert_eq!(
        negotiated(&l, TLS13_AES_128_GCM_SHA256, false, false).0,
        aes256
    );
    assert_eq!(negotiated(&l, chacha, false, false).0, chacha);
    // prefer_server_ciphers = false: the client's order, whatever it is.
    l.cipher_suites.clear();
    l.prefer_server_ciphers = false;
    assert_eq!(negotiated(&l, aes256, false, false).0, aes256);
    assert_eq!(negotiated(&l, aes256_12, true, false).0, aes256_12);
    assert_eq!(negotiated(&l, chacha, false, false).0, chacha);
}

/// A record after the client's Finished holding only the start of a
/// post-handshake message (RFC 8446 §5.1 lets a handshake message span
/// records). rustls keeps such a record in the driver's input, joining the
/// message in place; a done handshake dropped that input, and rustls' next
/// call on a fresh buffer indexed past its end: a panic of the shard's
/// thread, by any client. The handshake fails instead.
#[test]
fn a_post_handshake_message_cut_across_records_fails_the_handshake() {
    // A KeyUpdate's first three bytes (of its four-byte header).
    let mut hs = after_the_finished(rustls::ContentType::Handshake, &[24, 0, 0]);
    let mut step = hs.poll();
    while matches!(step, Ok(Step::Transmit)) {
        let out = hs.take_output();
        hs.output_sent(out);
        step = hs.poll();
    }
    assert!(
        matches!(step, Err(HandshakeError::Tls(_))),
        "got {step:?}: the handshake must fail, not finish with a record rustls still holds"
    );
}

/// A KeyUpdate asking for ours in the client's last flight, after its
/// Finished: rustls switches its sending key and holds the reply until it
/// seals a record, so the connection must say a reply is owed (the keys
/// may not go to the kernel before that record). A warning alert there
/// (`user_canceled`, as JDK clients send) looks the same to the count,
/// and the read sequence number at extraction tells it apart: it owes
/// nothing (such a client was closed unserved where the keys go to the
/// kernel at the handshake). Application data alone owes nothing.
#[test]
fn a_keyupdate_with_the_finished_leaves_a_reply_owed() {
    use rustls::ContentType::{Alert, ApplicationData, Handshake as Hs};
    // KeyUpdate, update_requested, then update_not_requested (RFC 8446
    // §4.6.3); a warning (1) user_canceled (90) alert (RFC 8446 §6);
    // application data.
    let cases: [(_, &[u8], bool, bool); 4] = [
        (Hs, &[24, 0, 0, 1, 1], true, true),
        (Hs, &[24, 0, 0, 1, 0], true, false),
        (Alert, &[1, 90], true, false),
        (ApplicationData, b"ping", false, false),
    ];
    for (typ, payload, maybe, owed) in cases {
        let mut hs = after_the_finished(typ, payload);
        assert_eq!(until_not_transmitting(&mut hs), Step::Done);
        let est = hs.finish();
        let after = est.after_finished;
        assert_eq!(after.records, 1, "{typ:?}");
        assert_eq!(after.maybe_owed(), maybe, "{typ:?}");
        let want: &[u8] = if typ == ApplicationData { b"ping" } else { b"" };
        assert_eq!(est.early_plaintext, want);
        let (secrets, _) = est.conn.dangerous_into_kernel_connection().unwrap();
        assert_eq!(after.owed(secrets.rx.0, secrets.tx.0), owed, "{payload:?}");
    }
}

/// A client that sends its request and its close_notify with its
/// Finished owes no KeyUpdate reply: the alert record is no KeyUpdate
/// (it was counted as one, and a connection whose keys go to the kernel
/// at the handshake was closed unserved).
#[test]
fn a_close_notify_with_the_finished_owes_no_reply() {
    use std::io::Write as _;
    let (l, root) = listener(false, true);
    let mut hs = start(&l);
    let mut c = extracting_client(root);
    until_the_clients_finished(&mut hs, &mut c);
    c.writer().write_all(b"ping").unwrap();
    c.send_close_notify();
    let mut flight = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut flight).unwrap();
    }
    hs.handle_input(&flight).unwrap();
    assert_eq!(until_not_transmitting(&mut hs), Step::Done);
    let est = hs.finish();
    assert!(!est.after_finished.maybe_owed());
    assert!(est.peer_closed);
    assert_eq!(est.early_plaintext, b"ping");
}

/// Polls, sending (to nobody) what the server transmits, until it asks for
/// something else: that step.
fn until_not_transmitting(hs: &mut Handshake) -> Step {
    let mut step = hs.poll().unwrap();
    while step == Step::Transmit {
        let out = hs.take_output();
        hs.output_sent(out);
        step = hs.poll().unwrap();
    }
    step
}
