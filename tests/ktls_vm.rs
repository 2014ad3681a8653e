//! kTLS tests. They need a kernel with kTLS, so `scripts/vm-tests.sh` runs
//! this binary inside a qemu VM (scripts/ktls-vm.sh) on Debian's 6.1 and
//! 6.18 kernels. Each test proves the kernel did the record crypto —
//! `getsockopt(TCP_ULP)` reads "tls", `/proc/net/tls_stat` counters move —
//! so a silent fallback to userspace fails it.
//!
//! Outside the VM (no `KTERN_IN_VM`) and without kTLS they are skipped with
//! a message; with `KTERN_IN_VM` set, missing kTLS is a failure.

mod common;

use std::io::{Read, Write};

use common::*;
use rustls::CipherSuite::*;

/// True when the tests should run; panics in the VM if kTLS is missing.
fn ktls_here() -> bool {
    let available = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .is_ok_and(|s| s.split_whitespace().any(|u| u == "tls"));
    let in_vm = std::env::var_os("KTERN_IN_VM").is_some();
    assert!(
        available || !in_vm,
        "KTERN_IN_VM is set but the kernel has no kTLS ULP"
    );
    if !available {
        eprintln!("skipped: no kTLS in this kernel (run scripts/vm-tests.sh)");
    }
    available
}

fn kernel() -> String {
    std::env::var("KTERN_VM_KERNEL").unwrap_or_default()
}

fn ktern(tag: &str, runtime: &str) -> (Pki, Ktern) {
    let pki = Pki::new(tag);
    let backend = start_backend();
    let k = Ktern::start(&pki, runtime, &tcp_listener(backend, ""));
    (pki, k)
}

#[test]
fn every_version_and_cipher_is_sealed_by_the_kernel() {
    if !ktls_here() {
        return;
    }
    let (pki, k) = ktern("suites", "ktls = \"required\"");
    let mut connections = 0;
    for (tls12, suite) in [
        (false, TLS13_AES_128_GCM_SHA256),
        (false, TLS13_AES_256_GCM_SHA384),
        (false, TLS13_CHACHA20_POLY1305_SHA256),
        (true, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
        (true, TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384),
        (true, TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256),
    ] {
        let before = tls_stat();
        let opts = ClientOpts {
            tls12,
            suite: Some(suite),
            ..ClientOpts::default()
        };
        // Both end with close_notify in both directions: the client's
        // (upload) reaches the backend as a FIN; the server's is required by
        // read_to_close_notify.
        download(k.addr(), &pki, opts, 300_000);
        upload(k.addr(), &pki, opts, 300_000);
        connections += 2;
        assert_eq!(
            tls_stat_since(&before, "TlsTxSw"),
            2,
            "{suite:?}: kernel TX contexts"
        );
        assert_eq!(
            tls_stat_since(&before, "TlsRxSw"),
            2,
            "{suite:?}: kernel RX contexts"
        );
        assert_eq!(
            k.wait_metric("ktern_ktls_offloaded_total", connections),
            connections,
            "{suite:?}"
        );
    }
    assert_eq!(userspace_while_open(&k), 0);
}

#[test]
fn large_transfers_splice_through_the_kernel_byte_exact() {
    if !ktls_here() {
        return;
    }
    let (pki, k) = ktern("large", "ktls = \"required\"");
    let before = tls_stat();
    download(k.addr(), &pki, ClientOpts::default(), 16 << 20);
    upload(k.addr(), &pki, ClientOpts::default(), 16 << 20);
    assert_eq!(tls_stat_since(&before, "TlsTxSw"), 2);
    // The download, plus the upload's reply line "<count> <sha256 hex>\n".
    let want = (16 << 20) + format!("{} {}\n", 16 << 20, "0".repeat(64)).len() as u64;
    assert_eq!(
        k.wait_metric("ktern_bytes_backend_to_client_total", want),
        want
    );
}

#[test]
fn ktls_off_keeps_records_in_userspace() {
    if !ktls_here() {
        return;
    }
    let (pki, k) = ktern("off", "ktls = \"off\"");
    let before = tls_stat();
    download(k.addr(), &pki, ClientOpts::default(), 100_000);
    assert_eq!(tls_stat_since(&before, "TlsTxSw"), 0);
    assert_eq!(k.wait_metric("ktern_ktls_userspace_total", 1), 1);
    assert_eq!(k.metric("ktern_ktls_offloaded_total"), 0);
}

/// A client's KeyUpdates with no application data between them: 32 are
/// taken on the kernel path, as rustls takes them on the userspace path;
/// the 33rd ends the connection with unexpected_message (each costs a key
/// derivation and a setsockopt for a 27-byte record). Kernels with rekey.
#[test]
fn keyupdates_without_data_are_capped_on_the_kernel_path() {
    if !ktls_here() || !tls_stat().contains_key("TlsRxRekeyOk") {
        return;
    }
    let (pki, k) = ktern("keyupdates", "ktls = \"required\"");
    let before = tls_stat();
    let mut c = connect(k.addr(), &pki, ClientOpts::default());
    c.write_all(b"ECHO\nfirst").unwrap();
    let mut echoed = [0u8; 5];
    c.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"first");
    assert_eq!(k.metric("ktern_ktls_offloaded_total"), 1);
    for _ in 0..32 {
        c.conn.refresh_traffic_keys().unwrap();
    }
    c.write_all(b"again").unwrap();
    c.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"again", "32 KeyUpdates in a row are taken");
    for _ in 0..33 {
        c.conn.refresh_traffic_keys().unwrap();
    }
    let _ = c.flush();
    let err = c.read_exact(&mut echoed).expect_err("the 33rd ends it");
    assert!(format!("{err:?}").contains("UnexpectedMessage"), "{err:?}");
    assert_eq!(k.wait_metric("ktern_ktls_rekey_rx_total", 64), 64);
    // The kernel installed those 64 keys itself (rustls, on a silent
    // fallback, would have too).
    assert_eq!(tls_stat_since(&before, "TlsRxRekeyOk"), 64);
}

#[test]
fn client_key_update_rekeys_or_closes_with_an_alert() {
    if !ktls_here() {
        return;
    }
    let (pki, k) = ktern("keyupdate", "ktls = \"required\"");
    let before = tls_stat();
    let mut c = connect(k.addr(), &pki, ClientOpts::default());
    // Whatever the kernel does with the KeyUpdate, this connection's records
    // must be the kernel's: a userspace fallback would rekey in rustls and
    // pass the 6.18 branch's data checks on its own.
    let first = pattern(5000, 1);
    c.write_all(b"ECHO\n").unwrap();
    c.write_all(&first).unwrap();
    let mut echoed = vec![0u8; first.len()];
    c.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, first);
    assert_eq!(
        tls_stat_since(&before, "TlsRxSw"),
        1,
        "the connection was not offloaded"
    );
    assert_eq!(k.metric("ktern_ktls_offloaded_total"), 1);
    // KeyUpdate with update_requested (RFC 8446 §4.6.3), then more data.
    c.conn.refresh_traffic_keys().unwrap();
    let second = pattern(7000, 2);
    let _ = c.write_all(&second);
    let _ = c.flush();
    let mut echoed = vec![0u8; second.len()];
    let res = c.read_exact(&mut echoed);
    let rekey_works = tls_stat().contains_key("TlsRxRekeyOk");
    if rekey_works {
        res.unwrap_or_else(|e| {
            panic!(
                "kernel {} supports rekey but the stream broke: {e}\n{}",
                kernel(),
                k.log()
            )
        });
        assert_eq!(echoed, second, "data after the KeyUpdate");
        c.conn.send_close_notify();
        c.flush().unwrap();
        let rest = read_to_close_notify(&mut c);
        assert!(rest.is_empty());
        assert_eq!(tls_stat_since(&before, "TlsRxRekeyOk"), 1);
        // The client asked for an update: ktern sent its own KeyUpdate and
        // installed a new TX key before its next record.
        assert_eq!(tls_stat_since(&before, "TlsTxRekeyOk"), 1);
        assert_eq!(k.wait_metric("ktern_ktls_rekey_rx_total", 1), 1);
        assert_eq!(k.metric("ktern_ktls_rekey_tx_total"), 1);
    } else {
        let err = res.expect_err("no kernel rekey: ktern must close with an alert");
        let text = format!("{err:?}");
        assert!(
            text.contains("InternalError"),
            "expected an internal_error alert, got {text}"
        );
        assert_eq!(k.wait_metric("ktern_ktls_rekey_unsupported_total", 1), 1);
    }
    // Other connections are unaffected.
    download(k.addr(), &pki, ClientOpts::default(), 1000);
}

#[test]
fn the_socket_ulp_is_tls_after_the_handoff() {
    if !ktls_here() {
        return;
    }
    let pki = Pki::new("ulp");
    let (addr, server) = serve_one(&pki, |sock, est| async move {
        {
            let conn = required(sock, est).unwrap();
            let ulp = conn.kernel_ulp().unwrap();
            let path = conn.path();
            let (mut rd, mut wr) = conn.split();
            let chunk = rd.read_chunk().await.unwrap().unwrap();
            let (res, _) = wr.write_all(chunk).await;
            res.unwrap();
            wr.close().await.unwrap();
            (ulp, path)
        }
    });
    let mut c = connect(addr, &pki, ClientOpts::default());
    c.write_all(b"hello kernel").unwrap();
    let got = read_to_close_notify(&mut c);
    assert_eq!(got, b"hello kernel");
    let (ulp, path) = server.join().unwrap();
    assert_eq!(ulp, "tls");
    assert_eq!(path, ktern::ktls::Path::Kernel);
}

/// Accepts one connection on a new thread's monoio runtime, runs ktern's
/// handshake on it (`test_listener`'s config), then `then` with the socket
/// and the finished handshake; returns the address to connect to and the
/// thread (joined for `then`'s result).
fn serve_one<T, F>(
    pki: &Pki,
    then: impl FnOnce(monoio::net::TcpStream, ktern::handshake::Established) -> F + Send + 'static,
) -> (std::net::SocketAddr, std::thread::JoinHandle<T>)
where
    F: std::future::Future<Output = T>,
    T: Send + 'static,
{
    use ktern::handshake::{self, Handshake};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = test_listener(pki);
    let server = std::thread::spawn(move || {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = monoio::net::TcpListener::from_std(listener).unwrap();
            let (mut sock, _) = listener.accept().await.unwrap();
            let tls = handshake::server_config(
                &cfg,
                &handshake::cert_store(&cfg),
                &handshake::ticketer(),
            )
            .unwrap();
            let hs = Handshake::new(&tls).unwrap();
            let est = handshake::pump::run(&mut sock, hs, std::time::Duration::from_secs(30))
                .await
                .unwrap();
            then(sock, est).await
        })
    });
    (addr, server)
}

/// The record path for a finished handshake under `ktls = "required"`,
/// at the handshake (no deferral).
fn required(
    sock: monoio::net::TcpStream,
    est: ktern::handshake::Established,
) -> Result<ktern::ktls::TlsConn, ktern::ktls::OffloadError> {
    let support = ktern::ktls::probe();
    ktern::ktls::establish(
        sock,
        est,
        (ktern::config::KtlsMode::Required, &support),
        None,
    )
}

/// [`required`], which must have given the keys to the kernel: ktern's
/// path says so, and the socket's ULP is `tls` (`getsockopt(TCP_ULP)`), so
/// every byte read from it later is the kernel's decryption.
fn on_the_kernel(
    sock: monoio::net::TcpStream,
    est: ktern::handshake::Established,
) -> ktern::ktls::TlsConn {
    let conn = required(sock, est).unwrap();
    assert_eq!(conn.path(), ktern::ktls::Path::Kernel);
    assert_eq!(conn.kernel_ulp().unwrap(), "tls");
    conn
}

/// Sends the tickets a handshake held for the first record
/// (`Established::unsent`), as the driver does before the keys go to the
/// kernel at the handshake.
async fn send_held_tickets(
    sock: &mut monoio::net::TcpStream,
    est: &mut ktern::handshake::Established,
) {
    use monoio::io::AsyncWriteRentExt;
    let (res, _) = sock.write_all(std::mem::take(&mut est.unsent)).await;
    res.unwrap();
}

fn test_listener(pki: &Pki) -> ktern::config::Listener {
    let pem = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    let cert = ktern::config::Certificate::from_pem(&pem(&pki.cert), &pem(&pki.key)).unwrap();
    let both = ktern::config::TlsVersions {
        tls12: true,
        tls13: true,
    };
    ktern::config::Listener::standalone("ulp", cert, both)
}

/// A deferred connection (`runtime.ktls_after`) hands its keys to the
/// kernel only at a record boundary: not below its threshold, not while a
/// record is partly received (those bytes are rustls'), and then at once;
/// the kernel carries on with rustls' sequence numbers both ways.
#[test]
fn a_deferred_connection_hands_over_only_at_a_record_boundary() {
    if !ktls_here() {
        return;
    }
    use std::sync::mpsc;
    let pki = Pki::new("deferred");
    // Server → client: a step is done; client → server: the rest is sent.
    let (step_tx, step_rx) = mpsc::channel::<&'static str>();
    let (rest_tx, rest_rx) = mpsc::channel::<()>();
    let (addr, server) = serve_one(&pki, move |sock, est| async move {
        {
            let support = ktern::ktls::probe();
            let mode = (ktern::config::KtlsMode::Auto, &support);
            let conn = ktern::ktls::establish(sock, est, mode, Some(1000)).unwrap();
            assert_eq!(conn.path(), ktern::ktls::Path::Userspace);
            assert_eq!(
                conn.kernel_ulp().unwrap(),
                "",
                "no ULP before the hand-over"
            );
            let (mut rd, mut wr) = conn.split();
            let mut got = Vec::new();
            while got.len() < 4 {
                got.extend(rd.read_chunk().await.unwrap().unwrap());
            }
            assert_eq!(got, b"ping");
            assert!(!wr.bulk_ahead(999).unwrap(), "below the threshold");
            let (res, _) = wr.write_all(b"pong".to_vec()).await;
            res.unwrap();
            step_tx.send("pong").unwrap();
            // The client sent half a record: read it into rustls' buffer
            // (the read waits for the rest, and is given up).
            let partial =
                monoio::time::timeout(std::time::Duration::from_secs(2), rd.read_chunk()).await;
            assert!(partial.is_err(), "half a record gave plaintext");
            assert!(!wr.bulk_ahead(1 << 20).unwrap(), "moved mid-record");
            assert_eq!(wr.path(), ktern::ktls::Path::Userspace);
            step_tx.send("held").unwrap();
            rest_rx.recv().unwrap();
            let mut got = Vec::new();
            while got.len() < 5 {
                got.extend(rd.read_chunk().await.unwrap().unwrap());
            }
            assert_eq!(got, b"split");
            assert!(wr.bulk_ahead(1 << 20).unwrap(), "at a record boundary");
            assert_eq!(wr.path(), ktern::ktls::Path::Kernel);
            assert_eq!(rd.path(), ktern::ktls::Path::Kernel);
            // Bulk out, then the client's records in, on the kernel's keys.
            let (res, _) = wr.write_all(pattern(300_000, 5)).await;
            res.unwrap();
            let mut got = Vec::new();
            while got.len() < 100_000 {
                got.extend(rd.read_chunk().await.unwrap().unwrap());
            }
            assert_eq!(got, pattern(100_000, 6));
            wr.close().await.unwrap();
        }
    });
    let mut c = connect(addr, &pki, ClientOpts::default());
    c.write_all(b"ping").unwrap();
    assert_eq!(step_rx.recv().unwrap(), "pong");
    // After the server's probe of the kernel's ciphers (its own sessions).
    let before = tls_stat();
    let mut pong = [0u8; 4];
    c.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"pong");
    // One record, sent in two halves.
    let record = sealed_by(&mut c, b"split");
    let half = record.len() / 2;
    c.sock.write_all(&record[..half]).unwrap();
    assert_eq!(step_rx.recv().unwrap(), "held");
    assert_eq!(
        tls_stat_since(&before, "TlsTxSw"),
        0,
        "nothing in the kernel yet"
    );
    c.sock.write_all(&record[half..]).unwrap();
    rest_tx.send(()).unwrap();
    let mut bulk = vec![0u8; 300_000];
    c.read_exact(&mut bulk).unwrap();
    assert!(bulk == pattern(300_000, 5), "bulk bytes differ");
    c.write_all(&pattern(100_000, 6)).unwrap();
    assert!(read_to_close_notify(&mut c).is_empty());
    server.join().unwrap();
    // This one connection, both keys, and nothing else (the probe ran before).
    assert_eq!(tls_stat_since(&before, "TlsTxSw"), 1);
    assert_eq!(tls_stat_since(&before, "TlsRxSw"), 1);
}

/// A server for one connection whose client sent a KeyUpdate asking for
/// ours, then "ping": rustls switched its sending key and holds the reply
/// until it seals a record. With `mode` and `defer`, the keys must stay
/// with rustls until "pong" carried the reply out, then go to the kernel
/// for a bulk transfer of 300,000 bytes of `pattern(_, seed)`, once the
/// client says go (after its `tls_stat` snapshot). `with_finished`: the
/// KeyUpdate came in the Finished's flight.
fn keyupdate_then_bulk_server(
    pki: &Pki,
    mode: ktern::config::KtlsMode,
    defer: Option<u64>,
    with_finished: bool,
    seed: u64,
) -> (
    std::net::SocketAddr,
    std::thread::JoinHandle<()>,
    std::sync::mpsc::Sender<()>,
) {
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (addr, server) = serve_one(pki, move |sock, est| async move {
        assert_eq!(
            est.after_finished.maybe_owed(),
            with_finished,
            "a reply owed at the handshake"
        );
        let support = ktern::ktls::probe();
        let conn = ktern::ktls::establish(sock, est, (mode, &support), defer).unwrap();
        assert_eq!(conn.path(), ktern::ktls::Path::Userspace);
        let (mut rd, mut wr) = conn.split();
        let mut got = Vec::new();
        while got.len() < 4 {
            got.extend(rd.read_chunk().await.unwrap().unwrap());
        }
        assert_eq!(got, b"ping");
        assert!(
            !wr.bulk_ahead(1 << 20).unwrap(),
            "handed over with the KeyUpdate reply still held"
        );
        let (res, _) = wr.write_all(b"pong".to_vec()).await;
        res.unwrap();
        go_rx.recv().unwrap();
        assert!(wr.bulk_ahead(1 << 20).unwrap(), "after the reply went out");
        assert_eq!(wr.path(), ktern::ktls::Path::Kernel);
        let (res, _) = wr.write_all(pattern(300_000, seed)).await;
        res.unwrap();
        wr.close().await.unwrap();
    });
    (addr, server, go_tx)
}

/// The client's side of [`keyupdate_then_bulk_server`] after its "ping":
/// "pong", then the bulk, which must be the kernel's records.
fn pong_then_bulk(
    mut c: Client,
    server: std::thread::JoinHandle<()>,
    go: std::sync::mpsc::Sender<()>,
    seed: u64,
) {
    let mut pong = [0u8; 4];
    c.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"pong");
    // After the server's probe of the kernel's ciphers (its own sessions),
    // before the hand-over.
    let before = tls_stat();
    go.send(()).unwrap();
    let mut bulk = vec![0u8; 300_000];
    c.read_exact(&mut bulk).unwrap();
    assert!(bulk == pattern(300_000, seed), "bulk bytes differ");
    assert!(read_to_close_notify(&mut c).is_empty());
    server.join().unwrap();
    assert_eq!(tls_stat_since(&before, "TlsTxSw"), 1);
}

/// A client that sends its Finished, a KeyUpdate asking for ours and
/// "ping" in one write.
fn finished_with_keyupdate(addr: std::net::SocketAddr, pki: &Pki) -> Client {
    let mut conn =
        rustls::ClientConnection::new(client_config(&[&pki.der]), "localhost".try_into().unwrap())
            .unwrap();
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    until_the_finished(&mut conn, &mut sock);
    conn.refresh_traffic_keys().unwrap();
    conn.writer().write_all(b"ping").unwrap();
    sock.write_all(&pending_tls(&mut conn)).unwrap();
    rustls::StreamOwned::new(conn, sock)
}

/// The same KeyUpdate in the client's last flight, after its Finished:
/// rustls read it in the handshake. A deferred connection hands over only
/// after its first record carried the reply out. One whose keys go to the
/// kernel at the handshake (`required`, no deferral) is closed: deferred,
/// it would wait for a bulk transfer some routes never announce.
#[test]
fn a_keyupdate_with_the_finished_defers_the_hand_over_or_closes_at_once() {
    if !ktls_here() {
        return;
    }
    let pki = Pki::new("finished-keyupdate");
    let auto = ktern::config::KtlsMode::Auto;
    let (addr, server, go) = keyupdate_then_bulk_server(&pki, auto, Some(1000), true, 8);
    pong_then_bulk(finished_with_keyupdate(addr, &pki), server, go, 8);
    let (addr, server) = serve_one(&pki, move |mut sock, mut est| async move {
        assert!(
            est.after_finished.maybe_owed(),
            "the KeyUpdate came with the Finished"
        );
        send_held_tickets(&mut sock, &mut est).await;
        let res = required(sock, est);
        assert!(
            matches!(res, Err(ktern::ktls::OffloadError::ReplyOwed)),
            "{:?}",
            res.err()
        );
    });
    let mut c = finished_with_keyupdate(addr, &pki);
    let mut buf = [0u8; 16];
    let read = c.read(&mut buf);
    assert!(
        !matches!(read, Ok(n) if n > 0),
        "closed, not served: {read:?}"
    );
    server.join().unwrap();
}

/// JDK clients send a `user_canceled` warning alert in the flight of
/// their Finished. TLS 1.3 hides its type, so the handshake counts it as a
/// record that may be a KeyUpdate; the keys' sequence numbers at
/// extraction say it was not. With the keys going to the kernel at the handshake
/// (`required`), the connection is served and the kernel opens the
/// client's later records. (It was closed unserved.)
#[test]
fn a_user_canceled_alert_with_the_finished_owes_no_reply() {
    if !ktls_here() {
        return;
    }
    let pki = Pki::new("finished-alert");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (addr, server) = serve_one(&pki, move |mut sock, mut est| async move {
        assert!(
            est.after_finished.maybe_owed(),
            "the alert was read with the Finished"
        );
        send_held_tickets(&mut sock, &mut est).await;
        let conn = on_the_kernel(sock, est);
        ready_tx.send(()).unwrap();
        let (mut rd, _wr) = conn.split();
        let mut got = Vec::new();
        while let Some(chunk) = rd.read_chunk().await.unwrap() {
            got.extend(chunk);
        }
        got
    });
    let mut cfg = (*client_config(&[&pki.der])).clone();
    cfg.enable_secret_extraction = true;
    let mut conn =
        rustls::ClientConnection::new(std::sync::Arc::new(cfg), "localhost".try_into().unwrap())
            .unwrap();
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    until_the_finished(&mut conn, &mut sock);
    let mut flight = pending_tls(&mut conn);
    // A warning (1) user_canceled (90) alert, then data; later, more data
    // that only the kernel's key can open.
    let records = ktern::handshake::memory::sealed_records(
        conn,
        &[
            (rustls::ContentType::Alert, &[1, 90]),
            (rustls::ContentType::ApplicationData, b"ping"),
            (rustls::ContentType::ApplicationData, b" later"),
        ],
    );
    flight.extend_from_slice(&records[0]);
    flight.extend_from_slice(&records[1]);
    sock.write_all(&flight).unwrap();
    ready_rx.recv().unwrap();
    sock.write_all(&records[2]).unwrap();
    sock.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(server.join().unwrap(), b"ping later");
}

/// A client's KeyUpdate asking for ours, read while a deferred connection's
/// records are rustls': the keys go to the kernel only after the next
/// record carried the reply out. A hand-over before it gave the kernel the
/// new key with the reply never sent, and the client could read none of
/// the bulk (`DecryptError`).
#[test]
fn a_deferred_connection_sends_its_keyupdate_reply_before_the_hand_over() {
    if !ktls_here() {
        return;
    }
    let pki = Pki::new("deferred-keyupdate");
    let auto = ktern::config::KtlsMode::Auto;
    let (addr, server, go) = keyupdate_then_bulk_server(&pki, auto, Some(1000), false, 7);
    let mut c = connect(addr, &pki, ClientOpts::default());
    // KeyUpdate with update_requested (RFC 8446 §4.6.3), then a record.
    c.conn.refresh_traffic_keys().unwrap();
    c.write_all(b"ping").unwrap();
    c.flush().unwrap();
    pong_then_bulk(c, server, go, 7);
}

/// How [`half_a_record_then_a_fin_is_truncation_on_the_kernel_path`]'s
/// server reads: the HTTP/1.1 path's `read_chunk`, HTTP/2's `try_read`, or
/// the `tcp` route's `splice_to`.
#[derive(Clone, Copy, Debug)]
enum ReadBy {
    Chunks,
    Try,
    Splice,
}

/// Reads the client's plaintext on the kernel path until the stream ends
/// (`Ok`) or fails (`Err` with the error's kind), with what came before.
async fn read_to_end(
    rd: &mut ktern::ktls::TlsReader,
    by: ReadBy,
) -> (Vec<u8>, Result<(), &'static str>) {
    use ktern::ktls::stream::{Attempt, Spliced};
    use std::io::Read;
    let mut got = Vec::new();
    let pipe = ktern::sys::Pipe::new(0).unwrap();
    let mut out = std::fs::File::from(pipe.rx.try_clone().unwrap());
    loop {
        let step = match by {
            ReadBy::Chunks => match rd.read_chunk().await {
                Ok(Some(chunk)) => {
                    got.extend(chunk);
                    continue;
                }
                Ok(None) => Ok(()),
                Err(e) => Err(e.kind()),
            },
            ReadBy::Try => {
                let mut space = [std::mem::MaybeUninit::uninit(); 1 << 14];
                let mut buf = tokio::io::ReadBuf::uninit(&mut space);
                match rd.try_read(&mut buf) {
                    Ok(Attempt::Done(0)) => Ok(()),
                    Ok(Attempt::Done(_)) => {
                        got.extend_from_slice(buf.filled());
                        continue;
                    }
                    Ok(Attempt::WouldBlock) => {
                        rd.readable().await.unwrap();
                        continue;
                    }
                    Ok(Attempt::Slow) => panic!("a data record read the slow way"),
                    Err(e) => Err(e.kind()),
                }
            }
            ReadBy::Splice => match rd.splice_to(&pipe, 1 << 16).await {
                Ok(Spliced::Bytes(n)) => {
                    let mut buf = vec![0u8; n];
                    out.read_exact(&mut buf).unwrap();
                    got.extend(buf);
                    continue;
                }
                Ok(Spliced::WouldBlock) => {
                    rd.readable().await.unwrap();
                    continue;
                }
                Ok(Spliced::Eof) => Ok(()),
                Err(e) => Err(e.kind()),
            },
        };
        return (got, step);
    }
}

/// A client that sends a record, then half of the next and a FIN, has cut
/// its stream short. The kernel's `recv` returns 0 for it as for a FIN at a
/// record boundary; ktern must report it as truncated (as its userspace
/// path does), or a `tcp` route would pass the cut-off stream to its backend
/// as a complete one (a normal half-close). A FIN at a record boundary stays
/// a clean end.
#[test]
fn half_a_record_then_a_fin_is_truncation_on_the_kernel_path() {
    if !ktls_here() {
        return;
    }
    let pki = Pki::new("truncated");
    for by in [ReadBy::Chunks, ReadBy::Try, ReadBy::Splice] {
        for cut in [true, false] {
            // The keys go to the kernel before the client sends: a socket
            // that has had its FIN takes no ULP (ENOTCONN).
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
            let (addr, server) = serve_one(&pki, move |sock, est| async move {
                let conn = on_the_kernel(sock, est);
                ready_tx.send(()).unwrap();
                let (mut rd, _wr) = conn.split();
                read_to_end(&mut rd, by).await
            });
            let mut c = connect(addr, &pki, ClientOpts::default());
            ready_rx.recv().unwrap();
            c.write_all(b"whole record").unwrap();
            let record = sealed_by(&mut c, b"cut off");
            let end = if cut { record.len() / 2 } else { record.len() };
            c.sock.write_all(&record[..end]).unwrap();
            c.sock.shutdown(std::net::Shutdown::Write).unwrap();
            let (got, end) = server.join().unwrap();
            if cut {
                assert_eq!(got, b"whole record", "{by:?}");
                assert_eq!(end, Err("truncated"), "{by:?}: half a record, then FIN");
            } else {
                assert_eq!(got, b"whole recordcut off", "{by:?}");
                assert_eq!(end, Ok(()), "{by:?}: FIN at a record boundary");
            }
        }
    }
}
