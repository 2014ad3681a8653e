//! End-to-end: a real ktern process, a real backend and a real rustls client
//! over loopback. On a host without kTLS this exercises the userspace record
//! path; `tests/ktls_vm.rs` runs the kernel path inside the VM.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::ServerName;
use rustls::ClientConnection;

fn ktern_with_backend(tag: &str, runtime: &str) -> (Pki, Ktern) {
    let pki = Pki::new(tag);
    let backend = start_backend();
    let k = Ktern::start(&pki, runtime, &tcp_listener(backend, ""));
    (pki, k)
}

#[test]
fn byte_exact_transfers_both_ways() {
    let (pki, k) = ktern_with_backend("exact", "");
    for n in [1, 16 << 10, 1 << 20, 64 << 20] {
        download(k.addr(), &pki, ClientOpts::default(), n);
        upload(k.addr(), &pki, ClientOpts::default(), n);
    }
    let total = (1 + (16 << 10) + (1 << 20) + (64 << 20)) as u64;
    assert!(k.wait_metric("ktern_bytes_backend_to_client_total", total) >= total);
}

/// The byte counters move as a tunnel's bytes do, not at its close: a
/// tunnel open for hours counted nothing until it ended, then all at once.
#[test]
fn byte_counters_move_while_a_tunnel_is_open() {
    let (pki, k) = ktern_with_backend("live-bytes", "");
    let mut c = connect(k.addr(), &pki, ClientOpts::default());
    c.write_all(b"ECHO\n").unwrap();
    c.write_all(&[7u8; 1000]).unwrap();
    c.flush().unwrap();
    let mut back = [0u8; 1000];
    c.read_exact(&mut back).unwrap();
    assert_eq!(back, [7u8; 1000]);
    let up = k.wait_metric("ktern_bytes_client_to_backend_total", 1005);
    let down = k.wait_metric("ktern_bytes_backend_to_client_total", 1000);
    assert_eq!((up, down), (1005, 1000), "counted while the tunnel is open");
    drop(c);
    assert_eq!(k.wait_metric_down_to("ktern_connections_active", 0), 0);
    assert_eq!(k.metric("ktern_bytes_client_to_backend_total"), 1005);
    assert_eq!(k.metric("ktern_bytes_backend_to_client_total"), 1000);
}

#[test]
fn tls12_and_every_cipher_suite_work() {
    use rustls::CipherSuite::*;
    let (pki, k) = ktern_with_backend("suites", "");
    for (tls12, suite) in [
        (false, TLS13_AES_128_GCM_SHA256),
        (false, TLS13_AES_256_GCM_SHA384),
        (false, TLS13_CHACHA20_POLY1305_SHA256),
        (true, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
        (true, TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384),
        (true, TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256),
    ] {
        let opts = ClientOpts {
            tls12,
            suite: Some(suite),
            ..ClientOpts::default()
        };
        let c = connect(k.addr(), &pki, opts);
        assert_eq!(c.conn.negotiated_cipher_suite().unwrap().suite(), suite);
        drop(c);
        download(k.addr(), &pki, opts, 100_000);
        upload(k.addr(), &pki, opts, 100_000);
    }
}

#[test]
fn legacy_driver_carries_the_same_traffic() {
    let (pki, k) = ktern_with_backend("legacy", "driver = \"legacy\"");
    download(k.addr(), &pki, ClientOpts::default(), 1 << 20);
    upload(k.addr(), &pki, ClientOpts::default(), 1 << 20);
    assert!(k.log().contains("legacy (epoll) driver"), "{}", k.log());
}

#[test]
fn half_close_reaches_the_backend_and_the_reply_still_comes_back() {
    let (pki, k) = ktern_with_backend("halfclose", "");
    // The backend answers only after it reads EOF, so the reply proves the
    // client's close_notify became a FIN while the other direction stayed open.
    upload(k.addr(), &pki, ClientOpts::default(), 12345);
    upload(
        k.addr(),
        &pki,
        ClientOpts {
            tls12: true,
            ..ClientOpts::default()
        },
        54321,
    );
}

/// A client whose Finished, data, close_notify and FIN arrive in one
/// segment: by the time ktern's handshake ends its socket is in CLOSE_WAIT,
/// where Linux refuses the kTLS ULP (ENOTCONN). The connection is served
/// on userspace records instead of dropped, and counted as `peer_closed`.
#[test]
fn a_client_that_closes_with_its_finished_flight_is_still_served() {
    let (pki, k) = ktern_with_backend("early-fin", "cpus = [0]");
    let mut conn = ClientConnection::new(
        client_config(&[&pki.der]),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let mut sock = TcpStream::connect(k.addr()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20) * slow()))
        .unwrap();
    // The hello out, the server's flight in, until the client's Finished
    // is queued but not yet sent.
    until_the_finished(&mut conn, &mut sock);
    conn.writer().write_all(b"ECHO\nping").unwrap();
    conn.send_close_notify();
    let flight = pending_tls(&mut conn);
    // Corked, the shutdown's FIN rides on the same segment as the data
    // (tcp_send_fin tacks it onto an unsent skb), so ktern cannot see the
    // Finished before the FIN.
    let s = socket2::SockRef::from(&sock);
    s.set_tcp_cork(true).unwrap();
    sock.write_all(&flight).unwrap();
    sock.shutdown(std::net::Shutdown::Write).unwrap();
    let mut c = rustls::StreamOwned::new(conn, sock);
    assert_eq!(read_to_close_notify(&mut c), b"ping", "{}", k.log());
    if in_vm() {
        assert_eq!(
            k.metric_labeled(
                "ktern_ktls_userspace_reason_total",
                "reason=\"peer_closed\""
            ),
            1,
            "{}",
            k.log()
        );
    }
}

#[test]
fn garbage_instead_of_client_hello_is_closed_and_ktern_keeps_serving() {
    let (pki, k) = ktern_with_backend("garbage", "");
    let mut inputs: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        pattern(4096, 3),
        // A handshake record header claiming 65535 bytes (over the 2^14 limit).
        vec![22, 3, 1, 0xff, 0xff, 1, 2, 3],
        // A truncated ClientHello followed by a hang-up.
        vec![22, 3, 1, 0, 200, 1, 0, 0, 196, 3, 3],
    ];
    inputs.push(vec![0; 1]);
    for bytes in &inputs {
        let mut s = TcpStream::connect(k.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(bytes).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        // Either nothing or a TLS alert record (type 21) comes back, then EOF.
        assert!(reply.is_empty() || reply[0] == 21, "{reply:?}");
    }
    let failures = k.wait_metric("ktern_handshake_failures_tls_total", 3)
        + k.metric("ktern_handshake_failures_eof_total");
    assert!(failures >= inputs.len() as u64, "failures={failures}");
    download(k.addr(), &pki, ClientOpts::default(), 1000);
    assert!(!k.log().contains("panicked"));
    // Many more, as a scan or plain HTTP on port 443 would send: each is
    // counted, but logged at most once per 10 s per shard (the rest at
    // debug, which this test's ktern logs too), not a line each.
    let before = k.metric("ktern_handshake_failures_tls_total");
    for _ in 0..200 {
        let mut s = TcpStream::connect(k.addr()).unwrap();
        s.write_all(&inputs[0]).unwrap();
        let _ = s.read_to_end(&mut Vec::new());
    }
    k.wait_metric("ktern_handshake_failures_tls_total", before + 200);
    let lines = k
        .log()
        .matches("at most one line per 10 s, the others at debug")
        .count();
    // (One per shard per 10 s: two shards here, and the VM's slower run
    // may span a few such windows.)
    assert!(
        (1..=6).contains(&lines),
        "{lines} info lines for 205 failures"
    );
}

#[test]
fn silent_client_is_closed_at_the_handshake_deadline() {
    let (pki, k) = ktern_with_backend("timeout", "handshake_timeout = \"1s\"");
    let start = Instant::now();
    let mut s = TcpStream::connect(k.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).unwrap_or(0);
    let waited = start.elapsed();
    assert_eq!(n, 0, "closed without data");
    assert!(
        waited >= Duration::from_millis(900),
        "closed too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(10),
        "not closed by the deadline: {waited:?}"
    );
    assert_eq!(
        k.wait_metric("ktern_handshake_failures_timeout_total", 1),
        1
    );
    download(k.addr(), &pki, ClientOpts::default(), 10);
}

#[test]
fn refused_backend_closes_the_client_cleanly_and_is_counted() {
    let pki = Pki::new("refused");
    let (_held, dead) = refusing_port();
    let k = Ktern::start(&pki, "", &tcp_listener(dead, ""));
    let mut c = connect(k.addr(), &pki, ClientOpts::default());
    let _ = c.write_all(b"hello");
    let got = read_to_close_notify(&mut c);
    assert!(got.is_empty());
    assert_eq!(k.wait_metric("ktern_upstream_connect_failures_total", 1), 1);
}

/// The client's Finished, then in the same write a record holding only the
/// first three bytes of a KeyUpdate (a handshake message may span records,
/// RFC 8446 §5.1). rustls kept that record in the handshake's buffer, the
/// record path started from another, and rustls' next call panicked: the
/// shard's thread (the only one here) died with everything on it. Now the
/// handshake fails, is counted, and the shard serves the next client.
#[test]
fn a_keyupdate_cut_across_records_with_the_finished_fails_and_ktern_keeps_serving() {
    let (pki, k) = ktern_with_backend("cut-keyupdate", "cpus = [0]");
    let mut cfg = (*client_config(&[&pki.der])).clone();
    cfg.enable_secret_extraction = true;
    let mut c =
        ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap()).unwrap();
    let mut s = TcpStream::connect(k.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    until_the_finished(&mut c, &mut s);
    let mut flight = pending_tls(&mut c);
    flight.extend(ktern::handshake::memory::sealed_record(
        c,
        rustls::ContentType::Handshake,
        &[24, 0, 0],
    ));
    s.write_all(&flight).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert_eq!(
        k.wait_metric("ktern_handshake_failures_tls_total", 1),
        1,
        "{}",
        k.log()
    );
    download(k.addr(), &pki, ClientOpts::default(), 1000);
    assert!(!k.log().contains("panicked"), "{}", k.log());
}

#[test]
fn oversized_record_after_the_handshake_gets_an_alert() {
    let (pki, k) = ktern_with_backend("oversize", "");
    let mut c = connect(k.addr(), &pki, ClientOpts::default());
    // An application-data record header announcing 2^14 + 257 bytes: one more
    // than TLSCiphertext may carry (RFC 8446 §5.2).
    let len: u16 = (1 << 14) + 257;
    let mut rec = vec![23, 3, 3];
    rec.extend_from_slice(&len.to_be_bytes());
    rec.extend(std::iter::repeat_n(0, len as usize));
    c.sock.write_all(&rec).unwrap();
    let mut buf = [0u8; 64];
    let res = c.read(&mut buf);
    assert!(res.is_err(), "expected an alert, got {res:?}");
    // The record may arrive with the client's Finished (counted as a failed
    // handshake) or after it (a failed stream): either way, counted once.
    let counted = || {
        k.metric("ktern_downstream_errors_total") + k.metric("ktern_handshake_failures_tls_total")
    };
    let until = Instant::now() + Duration::from_secs(10);
    while counted() == 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(counted(), 1, "{}", k.log());
    download(k.addr(), &pki, ClientOpts::default(), 10);
}

#[test]
fn curl_and_openssl_interoperate() {
    let pki = Pki::new("curl");
    let http = ktern::builtin::start().unwrap();
    let k = Ktern::start(&pki, "", &tcp_listener(http, ""));
    let port = k.addr().port();
    let resolve = format!("localhost:{port}:127.0.0.1");
    let url = format!("https://localhost:{port}/");
    match std::process::Command::new("curl")
        .args(["-sS", "--resolve", &resolve, "--cacert"])
        .arg(&pki.cert)
        .arg(&url)
        .output()
    {
        Ok(out) => {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(String::from_utf8_lossy(&out.stdout), ktern::builtin::BODY);
        }
        Err(e) => eprintln!("curl not installed ({e}); skipped"),
    }
    for flag in ["-tls1_2", "-tls1_3"] {
        let child = std::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                "localhost",
                "-ign_eof",
                flag,
                "-CAfile",
            ])
            .arg(&pki.cert)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn();
        let Ok(mut child) = child else {
            eprintln!("openssl not installed; skipped");
            break;
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Verify return code: 0 (ok)"),
            "{flag}: {text}"
        );
        assert!(text.contains(ktern::builtin::BODY.trim()), "{flag}: {text}");
    }
}

#[test]
fn connection_cap_refuses_new_connections_and_keeps_serving_the_others() {
    // One shard, at most two connections.
    let (pki, k) = ktern_with_backend("cap", "cpus = [0]\nmax_connections = 2");
    let mut a = connect(k.addr(), &pki, ClientOpts::default());
    let mut b = connect(k.addr(), &pki, ClientOpts::default());
    a.write_all(b"ECHO\n").unwrap();
    b.write_all(b"ECHO\n").unwrap();
    let mut s = TcpStream::connect(k.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(&[22, 3, 1, 0, 1]);
    let mut buf = [0u8; 8];
    assert!(
        matches!(s.read(&mut buf), Ok(0) | Err(_)),
        "over-cap connection must be closed"
    );
    assert_eq!(k.wait_metric("ktern_connections_refused_total", 1), 1);
    for c in [&mut a, &mut b] {
        c.write_all(b"still here").unwrap();
        let mut got = [0u8; 10];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"still here");
    }
}

/// `max_conns_per_client`: one client (one address) holds at most that
/// many connections, counted across the shards; more are closed before
/// any TLS work and counted; another client is not affected; a closed
/// connection frees its place.
#[test]
fn one_client_holds_at_most_max_conns_per_client() {
    let pki = Pki::new("per-client");
    let backend = start_backend();
    let k = Ktern::start(&pki, "", &tcp_listener(backend, "max_conns_per_client = 2"));
    // Each connection's first `echo` starts the backend's echo mode.
    let started = std::cell::RefCell::new(std::collections::HashSet::new());
    let echo = |c: &mut Client| {
        if started.borrow_mut().insert(c.sock.local_addr().unwrap()) {
            c.write_all(b"ECHO\n").unwrap();
        }
        c.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
    };
    let one: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let mut a = connect_from(one, k.addr(), &pki);
    let mut b = connect_from(one, k.addr(), &pki);
    echo(&mut a);
    echo(&mut b);
    let mut third = tcp_from(one, k.addr()).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = third.write_all(&[22, 3, 1, 0, 1]);
    let mut buf = [0u8; 8];
    assert!(
        matches!(third.read(&mut buf), Ok(0) | Err(_)),
        "a third connection from one client must be closed"
    );
    assert_eq!(k.metric("ktern_connections_refused_per_client_total"), 1);
    // Refused at accept (no PROXY header to wait for), and counted as
    // accepted too, as the README says.
    assert_eq!(k.metric("ktern_connections_accepted_total"), 3);
    // Refused before any TLS work: no handshake began to fail.
    for failed in ["eof", "tls", "timeout"] {
        assert_eq!(
            k.metric(&format!("ktern_handshake_failures_{failed}_total")),
            0
        );
    }
    // Another client gets its own two.
    let two: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let mut c = connect_from(two, k.addr(), &pki);
    let mut d = connect_from(two, k.addr(), &pki);
    echo(&mut c);
    echo(&mut d);
    // A closed connection gives its place back.
    drop(a);
    assert_eq!(k.wait_metric_down_to("ktern_connections_active", 3), 3);
    let mut e = connect_from(one, k.addr(), &pki);
    echo(&mut e);
    echo(&mut b);
    assert_eq!(k.metric("ktern_connections_refused_per_client_total"), 1);
}

/// ktern with a `tcp` route to the echo backend, idle after 1 s.
fn idle_ktern(tag: &str) -> (Pki, Ktern) {
    let pki = Pki::new(tag);
    let k = Ktern::start(
        &pki,
        "",
        &tcp_listener(start_backend(), "")
            .replace("kind = \"tcp\"", "kind = \"tcp\"\nidle_timeout = \"1s\""),
    );
    (pki, k)
}

#[test]
fn idle_connections_are_closed_after_the_idle_timeout() {
    let (pki, k) = idle_ktern("idle");
    let mut c = connect(k.addr(), &pki, ClientOpts::default());
    c.write_all(b"ECHO\nping").unwrap();
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    let start = Instant::now();
    // Silence both ways: ktern closes with close_notify once the timeout passes.
    let rest = read_to_close_notify(&mut c);
    let waited = start.elapsed();
    assert!(rest.is_empty());
    assert!(
        waited >= Duration::from_millis(900),
        "closed too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "closed too late: {waited:?}"
    );
    assert_eq!(k.wait_metric("ktern_idle_timeouts_total", 1), 1);
}

/// A client that stops reading while a download fills its socket: no byte
/// moves, so the idle timeout ends the tunnel and the connection closes
/// (the write in flight is cancelled; the close_notify after it is bounded
/// by `CLOSE_NOTIFY_WAIT` in any case).
#[test]
fn a_client_that_stops_reading_is_closed_after_the_idle_timeout() {
    let (pki, k) = idle_ktern("idle-full");
    let mut c = connect(k.addr(), &pki, ClientOpts::default());
    // More than the loopback buffers on both sides hold; never read.
    c.write_all(b"DOWN 33554432 5\n").unwrap();
    c.flush().unwrap();
    assert_eq!(k.wait_metric("ktern_idle_timeouts_total", 1), 1);
    let until = Instant::now() + Duration::from_secs(10) * slow();
    while k.metric("ktern_connections_active") > 0 {
        assert!(
            Instant::now() < until,
            "the connection is still open 10 s after its idle timeout"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(c);
}

#[test]
fn backend_reset_aborts_the_client_instead_of_a_clean_close() {
    let (pki, k) = ktern_with_backend("reset", "");
    let mut c = connect(k.addr(), &pki, ClientOpts::default());
    c.write_all(b"RESET\n").unwrap();
    let mut all = Vec::new();
    let res = c.read_to_end(&mut all);
    // No close_notify may follow a backend failure: the client must see the
    // stream as broken (rustls reports the bare end as UnexpectedEof).
    assert!(res.is_err(), "clean close after a backend reset: {res:?}");
    assert_eq!(
        k.wait_metric("ktern_upstream_errors_total", 1),
        1,
        "{}",
        k.log()
    );
    download(k.addr(), &pki, ClientOpts::default(), 100);
}

/// A client whose FIN cuts its last record short has not ended its stream
/// whole: the backend gets a reset, not the FIN a complete stream ends with
/// (a backend commits an upload at its end). Here on rustls' records; in
/// the VM on the kernel's (`ktls_after = 0`), where the kernel's read
/// returns 0 for the cut as for a FIN at a record boundary.
#[test]
fn a_record_cut_by_the_clients_fin_resets_the_backend() {
    let pki = Pki::new("cut-record");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap();
    let k = Ktern::start(&pki, "ktls_after = \"0\"", &tcp_listener(backend, ""));
    let mut c = connect(k.addr(), &pki, ClientOpts::default());
    let (mut b, _) = listener.accept().unwrap();
    b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(b"whole record").unwrap();
    let mut got = [0u8; 12];
    b.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"whole record");
    let record = sealed_by(&mut c, b"cut off");
    c.sock.write_all(&record[..record.len() / 2]).unwrap();
    c.sock.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let end = b.read_to_end(&mut rest).map_err(|e| e.kind());
    assert_eq!(
        end,
        Err(std::io::ErrorKind::ConnectionReset),
        "the backend read {rest:?} and then a clean end"
    );
    assert_eq!(k.wait_metric("ktern_downstream_errors_total", 1), 1);
    assert_offloaded_in_vm(&k);
}

/// The same over a `tcp` route with `tls`: a lenient TLS backend (Go's at
/// a record boundary, OpenSSL with IGNORE_UNEXPECTED_EOF) takes a FIN
/// without close_notify as a whole stream's end, so the client's cut one
/// reaches it as a reset.
#[test]
fn a_record_cut_by_the_clients_fin_resets_a_tls_backend() {
    let pki = Pki::new("cut-record-tls");
    let backend_pki = Pki::new("cut-record-tls-backend");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap();
    let server = tls_server_config(&backend_pki, None);
    let accepted = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let conn = rustls::ServerConnection::new(server).unwrap();
        let mut b = rustls::StreamOwned::new(conn, sock);
        let mut got = [0u8; 12];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"whole record");
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).map_err(|e| e.kind())
    });
    let k = Ktern::start(
        &pki,
        "ktls_after = \"0\"",
        &format!(
            "{}tls = {{ ca = \"{}\", server_name = \"localhost\" }}\n",
            tcp_listener(backend, ""),
            backend_pki.cert.display()
        ),
    );
    let mut c = connect(k.addr(), &pki, ClientOpts::default());
    c.write_all(b"whole record").unwrap();
    c.flush().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let record = sealed_by(&mut c, b"cut off");
    c.sock.write_all(&record[..record.len() / 2]).unwrap();
    c.sock.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(
        accepted.join().unwrap(),
        Err(std::io::ErrorKind::ConnectionReset),
        "the backend read a FIN, as at the end of a whole stream"
    );
    assert_eq!(k.wait_metric("ktern_downstream_errors_total", 1), 1);
    // In the VM both sides were the kernel's (the cut read by its record
    // layer; the backend's records sealed by it): /proc/net/tls_stat moved.
    assert_offloaded_in_vm(&k);
    assert_upstream_offloaded_in_vm(&k, 1);
}

/// The other ends over a `tcp` route with `tls`: each side's end goes on
/// as it came. A FIN alone, at a record boundary, reaches the other side
/// as a FIN alone (which a strict TLS peer reads as a possible
/// truncation, RFC 8446 §6.1), never as ktern's close_notify, which would
/// vouch for it; a close_notify as one. Both directions: the backend's
/// end to the client, the client's to the backend.
#[test]
fn a_fin_alone_goes_on_without_close_notify_over_tls_both_ways() {
    let pki = Pki::new("fin-alone-tls");
    let backend_pki = Pki::new("fin-alone-tls-backend");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap();
    let server = tls_server_config(&backend_pki, None);
    // Each connection: the backend reads the client's stream to its end
    // (how it ended reported to the test), then sends `done` and ends as
    // the client did.
    let (tx, ends) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for sock in listener.incoming().flatten() {
            sock.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let conn = rustls::ServerConnection::new(server.clone()).unwrap();
            let mut b = rustls::StreamOwned::new(conn, sock);
            let mut got = Vec::new();
            let end = b.read_to_end(&mut got).map_err(|e| e.kind());
            let clean = end.is_ok();
            tx.send((got, end)).unwrap();
            b.write_all(b"done").unwrap();
            if clean {
                b.conn.send_close_notify();
            }
            b.flush().unwrap();
            b.sock.shutdown(std::net::Shutdown::Write).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let k = ktern_to_tls_backend(&pki, backend, &backend_pki);
    for (n, clean) in [true, false].into_iter().enumerate() {
        let mut c = connect(k.addr(), &pki, ClientOpts::default());
        until_a_ticket(&mut c);
        // In the VM, write only once ktern has handed this connection's
        // keys to the kernel: a FIN that comes first moves the socket to
        // CLOSE_WAIT, where Linux refuses the TLS ULP, and ktern rightly
        // carries the connection on userspace records (ktls::attach_ulp),
        // which the offload check below would fail (it did, in CI on
        // 6.18: the backend's TLS set-up comes between the two).
        if in_vm() {
            let offloaded = k.wait_metric("ktern_ktls_offloaded_total", n as u64 + 1);
            assert_eq!(offloaded, n as u64 + 1, "connection {n} was not offloaded");
        }
        c.write_all(b"request").unwrap();
        if clean {
            c.conn.send_close_notify();
        }
        c.flush().unwrap();
        c.sock.shutdown(std::net::Shutdown::Write).unwrap();
        let (got, end) = ends.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(got, b"request");
        let want = if clean {
            Ok(())
        } else {
            Err(std::io::ErrorKind::UnexpectedEof)
        };
        assert_eq!(end.map(|_| ()), want, "the backend's view, clean={clean}");
        let mut back = Vec::new();
        let end = c.read_to_end(&mut back).map_err(|e| e.kind());
        assert_eq!(back, b"done");
        assert_eq!(end.map(|_| ()), want, "the client's view, clean={clean}");
    }
    assert_offloaded_in_vm(&k);
    // Each client's backend leg too: the ends above crossed the kernel's
    // record layer on both sides.
    assert_upstream_offloaded_in_vm(&k, 2);
}

/// A data record with nothing in it (RFC 8446 §5.4 lets a peer send one,
/// to hide traffic's shape) is no end of the stream. The kernel's splice
/// returns 0 for one, as at a FIN (tls_sw_splice_read on 6.1; 6.18 reads
/// on): it cut the client's upload there, with a reset to the backend when
/// more was queued (seen on 6.1). Sealed here by hand (rustls sends none): `abc`, an empty
/// record, `def`, close_notify, in one write.
#[test]
fn an_empty_record_does_not_end_the_stream() {
    use rustls::crypto::cipher::{OutboundChunks, OutboundPlainMessage};
    use rustls::{ConnectionTrafficSecrets, ContentType, ProtocolVersion, SupportedCipherSuite};
    let pki = Pki::new("empty-record");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap();
    let got = std::thread::spawn(move || {
        let (mut b, _) = listener.accept().unwrap();
        b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).map(|_| got).map_err(|e| e.kind())
    });
    let k = Ktern::start(&pki, "ktls_after = \"0\"", &tcp_listener(backend, ""));
    let mut cfg = (*client_config(&[&pki.der])).clone();
    cfg.enable_secret_extraction = true;
    let mut c = try_connect(k.addr(), &Arc::new(cfg)).unwrap();
    until_a_ticket(&mut c);
    let SupportedCipherSuite::Tls13(suite) = c.conn.negotiated_cipher_suite().unwrap() else {
        panic!("TLS 1.3 expected");
    };
    let (conn, mut sock) = (c.conn, c.sock);
    let (seq, secrets) = conn.dangerous_extract_secrets().unwrap().tx;
    let (key, iv) = match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv),
        _ => panic!("a suite this test does not seal"),
    };
    let mut seal = suite.aead_alg.encrypter(key, iv);
    let mut out = Vec::new();
    for (i, (typ, payload)) in [
        (ContentType::ApplicationData, &b"abc"[..]),
        (ContentType::ApplicationData, b""),
        (ContentType::ApplicationData, b"def"),
        (ContentType::Alert, &[1, 0]),
    ]
    .into_iter()
    .enumerate()
    {
        let msg = OutboundPlainMessage {
            typ,
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(payload),
        };
        out.extend(seal.encrypt(msg, seq + i as u64).unwrap().encode());
    }
    sock.write_all(&out).unwrap();
    assert_eq!(got.join().unwrap(), Ok(b"abcdef".to_vec()));
    assert_offloaded_in_vm(&k);
}

/// Passthrough relays TCP, resets included: a client's reset reaches the
/// backend as one, not as the FIN of a whole stream.
#[test]
fn passthrough_passes_a_clients_reset_on() {
    let pki = Pki::new("passthrough-reset");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap();
    let k = Ktern::start(
        &pki,
        "",
        &format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n[listener.route]\nkind = \"passthrough\"\ndefault = \"raw\"\n[upstream.raw]\nbackends = [\"{backend}\"]\n"
        ),
    );
    let mut conn = passthrough_client(&pki, "any.test", &[]);
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    let mut c = TcpStream::connect(k.addr()).unwrap();
    c.write_all(&hello).unwrap();
    c.write_all(b"and then some").unwrap();
    let (mut b, _) = listener.accept().unwrap();
    b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = vec![0u8; hello.len() + 13];
    b.read_exact(&mut got).unwrap();
    assert_eq!(&got[hello.len()..], b"and then some");
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    let mut rest = Vec::new();
    assert_eq!(
        b.read_to_end(&mut rest).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the backend read a FIN, as at the end of a whole stream"
    );
}

#[test]
fn running_out_of_fds_at_accept_backs_off_counts_and_logs_rarely() {
    let pki = Pki::new("emfile");
    let backend = start_backend();
    // A hard limit ktern cannot raise; it needs about 20 fds to run.
    let k = Ktern::start_prefixed(
        &pki,
        "cpus = [0, 0]",
        &tcp_listener(backend, ""),
        &["prlimit", "--nofile=48:48"],
    );
    let flood: Vec<_> = (0..80)
        .filter_map(|_| std::net::TcpStream::connect(k.addr()).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    drop(flood);
    // The admin endpoint needs an fd too: wait until the held ones close.
    std::thread::sleep(Duration::from_millis(300));
    let errors = k.wait_metric("ktern_accept_errors_total", 1);
    assert!(
        errors >= 2,
        "accepts should have failed repeatedly: {errors}"
    );
    assert_eq!(k.metric("ktern_local_resource_errors_total"), errors);
    // Every failure counted, but at most one log line per shard per 10 s.
    let lines = k
        .log()
        .lines()
        .filter(|l| l.contains("accept failed"))
        .count();
    assert!(
        (1..=2).contains(&lines),
        "{lines} lines for {errors} failures"
    );
    // Still serving once fds are free again.
    download(k.addr(), &pki, ClientOpts::default(), 1000);
}

#[test]
fn a_handshake_that_fails_on_signature_schemes_gets_handshake_failure() {
    // The client accepts only ECDSA P-384 signatures; the key is P-256.
    // TLS 1.3 fails after the ServerHello (every queued message, then the
    // alert); TLS 1.2 fails before anything is sent and rustls queues no
    // alert (ktern sends a plaintext one).
    let (_pki, k) = ktern_with_backend("sigalgs", "");
    for flag in ["-tls1_2", "-tls1_3"] {
        let out = std::process::Command::new("openssl")
            .args(["s_client", "-connect", &k.addr().to_string(), flag])
            .args([
                "-sigalgs",
                "ecdsa_secp384r1_sha384",
                "-servername",
                "localhost",
            ])
            .stdin(std::process::Stdio::null())
            .output();
        let Ok(out) = out else {
            eprintln!("openssl not installed; skipped");
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(text.contains("alert handshake failure"), "{flag}: {text}");
    }
}

#[test]
fn memory_freed_by_a_flood_goes_back_to_the_kernel() {
    // glibc keeps what a flood freed in its arenas; runtime.memory_trim
    // hands it back once the burst is over (a bound on memory, not time).
    let pki = Pki::new("trim");
    let backend = start_backend();
    let k = Ktern::start(&pki, "cpus = [0]", &tcp_listener(backend, ""));
    let rss = || k.rss();
    let baseline = rss();
    let cfg = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    );
    // 1,500 half-open handshakes: a ClientHello each, then nothing.
    let mut held = Vec::new();
    for _ in 0..1500 {
        let mut conn =
            rustls::ClientConnection::new(cfg.clone(), "localhost".try_into().unwrap()).unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        let mut s = TcpStream::connect(k.addr()).unwrap();
        s.write_all(&hello).unwrap();
        held.push(s);
    }
    k.wait_metric("ktern_connections_active", 1500);
    let peak = rss();
    drop(held);
    assert_eq!(k.wait_metric_down_to("ktern_connections_active", 0), 0);
    assert!(
        k.wait_metric("ktern_memory_trims_total", 1) >= 1,
        "no trim after the flood"
    );
    let after = rss();
    assert!(
        peak > baseline + (8 << 20),
        "the flood should have cost memory: {baseline} -> {peak}"
    );
    assert!(
        after < baseline + (peak - baseline) / 4,
        "RSS stayed up: baseline {baseline}, peak {peak}, after {after}"
    );
}

/// What `n` idle connections cost ktern: bytes of RSS and open fds, each
/// per connection, over connections opened with `open` (each returned when
/// the server holds it idle).
fn cost_per_idle_connection<T>(k: &Ktern, n: usize, mut open: impl FnMut() -> T) -> (f64, f64) {
    // A first batch warms the allocator and the shard's caches (pipes, the
    // backend pool).
    drop((0..100).map(|_| open()).collect::<Vec<_>>());
    assert_eq!(k.wait_metric_down_to("ktern_connections_active", 0), 0);
    let before = k.rss();
    let fds_before = k.fds();
    let held: Vec<T> = (0..n).map(|_| open()).collect();
    assert_eq!(
        k.wait_metric("ktern_connections_active", n as u64),
        n as u64
    );
    std::thread::sleep(Duration::from_millis(300));
    let after = k.rss();
    let fds = k.fds().saturating_sub(fds_before);
    drop(held);
    (
        (after.saturating_sub(before)) as f64 / n as f64,
        fds as f64 / n as f64,
    )
}

/// The idle-connection budget (core issue; issue 12 found it regressed):
/// at most 4 KiB of ktern's memory per offloaded idle connection, 10 KiB on
/// the userspace record path, on both routes (an idle keep-alive HTTP
/// connection after one request). A bound on memory, not on time; in the
/// kTLS VM (scripts/vm-tests.sh) the offloaded budget applies.
#[test]
fn idle_connections_stay_within_their_memory_budget() {
    let kernel = std::env::var_os("KTERN_IN_VM").is_some();
    let budget = if kernel { 4096.0 } else { 10240.0 };
    let n = 1500;
    // Both ends hold n sockets (ktern two per connection): raise the limit
    // (as root, as in the VM, past the hard one), which ktern inherits.
    let _ = ktern::sys::set_nofile_limit(20_000);
    let _ = ktern::sys::raise_nofile_limit();
    let pki = Pki::new("idle-budget");
    let backend = start_backend();
    let k = Ktern::start(&pki, "cpus = [0]", &tcp_listener(backend, ""));
    let (per, fds) =
        cost_per_idle_connection(&k, n, || connect(k.addr(), &pki, ClientOpts::default()));
    eprintln!("tcp route: {per:.0} bytes and {fds:.3} fds per idle connection (budget {budget})");
    assert!(
        per <= budget,
        "tcp route: {per:.0} bytes per idle connection > {budget}"
    );
    // One fd per socket (issue 12): the client's and the backend's, no
    // `dup` per direction.
    assert!(fds <= 2.01, "tcp route: {fds:.3} fds per connection > 2");
    if kernel {
        assert!(k.metric("ktern_ktls_offloaded_total") >= n as u64);
        assert_eq!(userspace_while_open(&k), 0);
    }
    drop(k);

    let http = ktern::builtin::start().unwrap();
    let listener = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[[listener.certificate]]\ncert = \"@CERT@\"\nkey = \"@KEY@\"\n[listener.route]\nkind = \"http\"\nkeepalive_timeout = \"900s\"\n[[listener.route.rule]]\nupstream = \"b\"\n[upstream.b]\nbackends = [\"{http}\"]\n"
    );
    // The keep-alive timeout outlasts opening 1500 connections under the
    // VM's emulation (minutes; with the default 75 s the first ones idled
    // out before the last opened).
    let k = Ktern::start(&pki, "cpus = [0]", &listener);
    let (per, fds) = cost_per_idle_connection(&k, n, || {
        let mut c = connect(k.addr(), &pki, ClientOpts::default());
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        c.flush().unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains(ktern::builtin::BODY.trim()) {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        c
    });
    if kernel {
        assert!(k.metric("ktern_ktls_offloaded_total") >= n as u64);
        assert_eq!(userspace_while_open(&k), 0);
    }
    let http_budget = budget;
    eprintln!(
        "http route, idle keep-alive: {per:.0} bytes and {fds:.3} fds per connection (budget {http_budget})"
    );
    // The client's socket only: its backend connection went back to the
    // pool, which the next client reused.
    assert!(fds <= 1.01, "http route: {fds:.3} fds per connection > 1");
    assert!(
        per <= http_budget,
        "http route: {per:.0} bytes per idle keep-alive connection > {http_budget}"
    );
}

/// A connection that has sent nothing yet (a slowloris, or a flood of
/// them, each held for handshake_timeout) costs little: at most 12 KiB of
/// ktern's memory each (about 10.5 KiB measured here). Its handshake held
/// two full-record buffers from accept on, 33 KiB reserved, of which about
/// 15 KiB per connection showed in RSS before its first byte came.
#[test]
fn silent_connections_stay_within_their_memory_budget() {
    let budget = 12288.0;
    let n = 1000;
    let _ = ktern::sys::set_nofile_limit(20_000);
    let _ = ktern::sys::raise_nofile_limit();
    let pki = Pki::new("silent-budget");
    let backend = start_backend();
    let k = Ktern::start(&pki, "cpus = [0]", &tcp_listener(backend, ""));
    let (per, _) = cost_per_idle_connection(&k, n, || TcpStream::connect(k.addr()).unwrap());
    eprintln!("{per:.0} bytes per connection that sent nothing (budget {budget})");
    assert!(
        per <= budget,
        "{per:.0} bytes per connection that sent nothing > {budget}"
    );
}

/// `runtime.ktls_after` on a `tcp` route (the default hand-over, here at
/// 64 KiB): a connection's records stay on rustls while it exchanges small
/// messages, however many bytes those add up to (replies with requests
/// between them, or a backend pushing small messages), and its keys go to
/// the kernel, mid-connection, once the backend sends 64 KiB in full
/// records with nothing from the client in between (a bulk download). Every byte before and after
/// arrives intact, both ways, on TLS 1.3 and 1.2; in the kTLS VM the
/// kernel's own counters show the hand-over and when it happened.
/// A TCP stream that keeps a copy of every byte read: the server's
/// records as they crossed the wire.
struct Recorded {
    sock: TcpStream,
    seen: Vec<u8>,
}

impl std::io::Read for Recorded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.sock.read(buf)?;
        self.seen.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl std::io::Write for Recorded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sock.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.sock.flush()
    }
}

/// TLS 1.2 AES-GCM records carry an 8-byte explicit nonce (RFC 5288 §3)
/// that must never repeat under one key: the server's records after its
/// ChangeCipherSpec, read off the wire, all have their own, whether the
/// kernel took the keys at the handshake or after rustls sealed records
/// of its own (a deferred hand-over). The kernel counts up from the nonce
/// it is given, where rustls XORs its sequence number in: given rustls'
/// exported base, the kernel's first record reused the Finished's nonce.
/// In the VM the kernel sealed them (checked); here rustls did.
#[test]
fn tls12_records_never_repeat_an_explicit_nonce() {
    use std::io::BufRead;
    let pki = Pki::new("tls12nonce");
    let backend = start_backend();
    for after in ["0", "64k"] {
        let k = Ktern::start(
            &pki,
            &format!("ktls_after = \"{after}\"\n"),
            &tcp_listener(backend, ""),
        );
        for suite in [
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ] {
            let opts = ClientOpts {
                tls12: true,
                suite: Some(suite),
                ..ClientOpts::default()
            };
            let sock = TcpStream::connect(k.addr()).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let recorded = Recorded {
                sock,
                seen: Vec::new(),
            };
            let mut c = std::io::BufReader::new(rustls::StreamOwned::new(
                client_conn(&pki, opts),
                recorded,
            ));
            c.get_mut().write_all(b"LINES\n").unwrap();
            // Small exchanges (rustls' records on a deferred connection),
            // then a burst that moves the keys, then more small ones.
            for what in ["one", "two", "three"] {
                writeln!(c.get_mut(), "{what}").unwrap();
                let mut line = String::new();
                c.read_line(&mut line).unwrap();
                assert_eq!(line, format!("{what}\n"));
            }
            writeln!(c.get_mut(), "DOWN 200000 9").unwrap();
            let mut got = vec![0; 200_000];
            c.read_exact(&mut got).unwrap();
            assert!(got == pattern(200_000, 9));
            writeln!(c.get_mut(), "last").unwrap();
            let mut line = String::new();
            c.read_line(&mut line).unwrap();
            assert_eq!(line, "last\n");
            let wire = std::mem::take(&mut c.get_mut().sock.seen);
            // The server's records: type, version, length, then the
            // payload; from the ChangeCipherSpec on, each payload starts
            // with its explicit nonce.
            let (mut at, mut encrypted, mut nonces) = (0, false, Vec::new());
            while at + 5 <= wire.len() {
                let len = u16::from_be_bytes([wire[at + 3], wire[at + 4]]) as usize;
                let payload = &wire[at + 5..(at + 5 + len).min(wire.len())];
                if encrypted && payload.len() >= 8 {
                    nonces.push(u64::from_be_bytes(payload[..8].try_into().unwrap()));
                }
                if wire[at] == 20 {
                    encrypted = true;
                }
                at += 5 + len;
            }
            // The Finished, three echoes, the download's records, one more.
            assert!(
                nonces.len() > 15,
                "{after} {suite:?}: {} records",
                nonces.len()
            );
            let distinct: std::collections::HashSet<_> = nonces.iter().collect();
            assert_eq!(
                distinct.len(),
                nonces.len(),
                "{after} {suite:?}: an explicit nonce repeats: {nonces:x?}"
            );
        }
        if in_vm() {
            // The kernel sealed the download on every connection: ktern's
            // word, and the kernel's own (/proc/net/tls_stat), so a silent
            // fallback to rustls' records cannot pass for the kernel's.
            assert_eq!(k.metric("ktern_ktls_offloaded_total"), 2, "{after}");
            assert_offloaded_in_vm(&k);
        }
    }
}

#[test]
fn a_tcp_connection_moves_its_keys_to_the_kernel_at_the_backends_first_bulk_burst() {
    use std::io::BufRead;
    let pki = Pki::new("tcpafter");
    let backend = start_backend();
    let k = Ktern::start(&pki, "ktls_after = \"64k\"\n", &tcp_listener(backend, ""));
    let vm = in_vm();
    // Kernel TLS sessions set up since ktern is listening (its start-up
    // probe of the kernel's ciphers sets up some of its own before).
    let base = tls_stat();
    let sw = || ["TlsTxSw", "TlsRxSw"].map(|c| tls_stat_since(&base, c));
    for (i, tls12) in [false, true].into_iter().enumerate() {
        let i = i as u64;
        let opts = ClientOpts {
            tls12,
            ..ClientOpts::default()
        };
        let mut c = std::io::BufReader::new(connect(k.addr(), &pki, opts));
        c.get_mut().write_all(b"LINES\n").unwrap();
        let echo = |c: &mut std::io::BufReader<Client>, what: &str| {
            writeln!(c.get_mut(), "{what}").unwrap();
            let mut line = String::new();
            c.read_line(&mut line).unwrap();
            assert_eq!(line, format!("{what}\n"));
        };
        let down = |c: &mut std::io::BufReader<Client>, n: usize, seed: u64| {
            writeln!(c.get_mut(), "DOWN {n} {seed}").unwrap();
            let mut got = vec![0; n];
            c.read_exact(&mut got).unwrap();
            assert!(got == pattern(n, seed), "download of {n} differs");
        };
        for j in 0..5 {
            echo(&mut c, &format!("small {j}"));
        }
        // Two replies just under the threshold, with a request between
        // them: 120 KB in all, but no burst of 64 KiB.
        down(&mut c, 60_000, 1);
        echo(&mut c, "between");
        down(&mut c, 60_000, 2);
        // 80 KB pushed in 1 KB messages: no full record among them.
        writeln!(c.get_mut(), "DRIP 80000 1000 5").unwrap();
        let mut got = vec![0; 80_000];
        c.read_exact(&mut got).unwrap();
        assert!(got == pattern(80_000, 5), "the drip differs");
        if vm {
            assert_eq!(k.metric("ktern_ktls_deferred_total"), i + 1);
            assert_eq!(k.metric("ktern_ktls_promoted_total"), i);
            assert_eq!(sw(), [i; 2], "nothing in the kernel yet");
        }
        down(&mut c, 300_000, 3);
        // The same connection goes on, both directions, on the new path.
        echo(&mut c, "after");
        let data = pattern(100_000, 4);
        writeln!(c.get_mut(), "UP {}", data.len()).unwrap();
        c.get_mut().write_all(&data).unwrap();
        let mut line = String::new();
        c.read_line(&mut line).unwrap();
        assert_eq!(line, format!("{} {}\n", data.len(), sha256(&data)));
        echo(&mut c, "last");
        if vm {
            assert_eq!(k.metric("ktern_ktls_promoted_total"), i + 1);
            assert_eq!(k.metric("ktern_ktls_offloaded_total"), i + 1);
            assert_eq!(sw(), [i + 1; 2], "the kernel took both keys");
            assert_eq!(k.metric("ktern_ktls_userspace_total"), 0);
        }
    }
    if !vm {
        // No kTLS here: both connections stayed on rustls, nothing deferred.
        assert_eq!(k.metric("ktern_ktls_deferred_total"), 0);
        assert_eq!(k.metric("ktern_ktls_userspace_total"), 2);
        assert_eq!(k.metric("ktern_ktls_promoted_total"), 0);
    }
}

/// A passthrough listener: `*.wild.test` to backend `wild`, `a.sni.test`
/// to `a` (with ALPN h2 to `a2`), the rest to `fallback` when `default`.
fn passthrough_config(pki: &Pki, default: bool, extra_route: &str) -> String {
    let (a, a2, wild, fallback) = (
        start_tls_backend("a", pki),
        start_tls_backend("a2", pki),
        start_tls_backend("wild", pki),
        start_tls_backend("fallback", pki),
    );
    format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[listener.route]\nkind = \"passthrough\"\n{}hello_timeout = \"1s\"\n{extra_route}\n\
         [[listener.route.rule]]\nsni = \"*.wild.test\"\nupstream = \"wild\"\n\
         [[listener.route.rule]]\nsni = \"a.sni.test\"\nupstream = \"a\"\n\
         [[listener.route.rule]]\nsni = \"a.sni.test\"\nalpn = \"h2\"\nupstream = \"a2\"\n\
         [upstream.a]\nbackends = [\"{a}\"]\n[upstream.a2]\nbackends = [\"{a2}\"]\n\
         [upstream.wild]\nbackends = [\"{wild}\"]\n[upstream.fallback]\nbackends = [\"{fallback}\"]\n",
        if default { "default = \"fallback\"\n" } else { "" },
    )
}

/// A client trusting only the backends' certificate (`pki`'s), sending
/// `sni` (`""`: no SNI, verifying the name `localhost`) and offering
/// `alpn`.
fn passthrough_client(pki: &Pki, sni: &str, alpn: &[&[u8]]) -> ClientConnection {
    let mut cfg = (*client_config(&[&pki.der])).clone();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    cfg.enable_sni = !sni.is_empty();
    let name = if sni.is_empty() { "localhost" } else { sni };
    ClientConnection::new(
        Arc::new(cfg),
        ServerName::try_from(name.to_string()).unwrap(),
    )
    .unwrap()
}

/// The backend's greeting line through `k`, after an echo round trip.
fn through_passthrough(k: &Ktern, conn: ClientConnection) -> std::io::Result<String> {
    let sock = TcpStream::connect(k.addr())?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    greeting_after_echo(&mut rustls::StreamOwned::new(conn, sock))
}

/// Sends `ping` on `s`, reads a [`start_tls_backend`]'s greeting line and
/// the echo: the greeting (an error when the connection ended instead).
fn greeting_after_echo(s: &mut (impl Read + Write)) -> std::io::Result<String> {
    s.write_all(b"ping")?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        s.read_exact(&mut b)?;
        line.push(b[0]);
    }
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo)?;
    assert_eq!(&echo, b"ping");
    Ok(String::from_utf8(line).unwrap().trim().to_string())
}

#[test]
fn passthrough_routes_tls_by_sni_and_alpn_without_terminating_it() {
    let pki = Pki::new("passthrough");
    let k = Ktern::start(&pki, "", &passthrough_config(&pki, true, ""));
    let cases: [(&str, &[&[u8]], &str); 5] = [
        ("a.sni.test", &[], "a sni=a.sni.test alpn=-"),
        (
            "a.sni.test",
            &[b"h2", b"http/1.1"],
            "a2 sni=a.sni.test alpn=h2",
        ),
        (
            "a.sni.test",
            &[b"http/1.1"],
            "a sni=a.sni.test alpn=http/1.1",
        ),
        ("x.wild.test", &[], "wild sni=x.wild.test alpn=-"),
        // No SNI: the default.
        ("", &[], "fallback sni=- alpn=-"),
    ];
    for (sni, alpn, want) in cases {
        let got = through_passthrough(&k, passthrough_client(&pki, sni, alpn)).unwrap();
        assert_eq!(got, want, "{sni} {alpn:?}");
    }
    // The client verified the backend's certificate end to end: ktern has
    // none here, and did no handshake.
    assert_eq!(k.metric("ktern_handshakes_total"), 0);
    assert_eq!(k.metric("ktern_passthrough_connections_total"), 5);
    // A large transfer goes through byte for byte.
    let mut s = {
        let sock = TcpStream::connect(k.addr()).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        rustls::StreamOwned::new(passthrough_client(&pki, "a.sni.test", &[]), sock)
    };
    let data = pattern(4 << 20, 11);
    let mut line = String::new();
    {
        let mut r = std::io::BufReader::new(&mut s);
        std::io::BufRead::read_line(&mut r, &mut line).unwrap();
    }
    assert_eq!(line, "a sni=a.sni.test alpn=-\n");
    let mut got = vec![0u8; data.len()];
    for (chunk, back) in data.chunks(64 << 10).zip(got.chunks_mut(64 << 10)) {
        s.write_all(chunk).unwrap();
        s.read_exact(back).unwrap();
    }
    assert!(got == data, "the echo differs");
    // Counted when the connection ends.
    drop(s);
    let moved = (4 << 20) as u64;
    assert!(k.wait_metric("ktern_bytes_client_to_backend_total", moved) >= moved);
}

/// A passthrough group's connect checks (`check = "tcp"`, HAProxy's plain
/// `check`): a backend that refuses connections is marked down and
/// skipped; one that takes them stays up, though it speaks no HTTP in the
/// clear (an HTTP check, which the config refuses here, failed on every
/// TLS backend and marked them all down).
#[test]
fn passthrough_backends_are_health_checked_by_connect() {
    let pki = Pki::new("passthrough-health");
    let live = start_tls_backend("live", &pki);
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let k = Ktern::start(
        &pki,
        "",
        &format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n[listener.route]\nkind = \"passthrough\"\ndefault = \"pool\"\n\
             [upstream.pool]\nbackends = [\"{dead}\", \"{live}\"]\n\
             [upstream.pool.health]\ncheck = \"tcp\"\ninterval = \"100ms\"\nfall = 1\nrise = 1\n"
        ),
    );
    assert_eq!(k.wait_metric("ktern_health_marked_down_total", 1), 1);
    // Checks of both go on; only the dead one fails.
    let checks = k.metric("ktern_health_checks_total");
    assert!(k.wait_metric("ktern_health_checks_total", checks + 6) >= checks + 6);
    assert_eq!(k.metric("ktern_health_marked_down_total"), 1);
    assert_eq!(k.metric("ktern_upstream_backends_down"), 1);
    let (checks, failures) = (
        k.metric("ktern_health_checks_total"),
        k.metric("ktern_health_check_failures_total"),
    );
    assert!(
        failures * 2 <= checks + 2,
        "{failures} of {checks} checks failed"
    );
    // Round robin over the two, and every connection reaches the live one.
    for _ in 0..4 {
        let got = through_passthrough(&k, passthrough_client(&pki, "a.sni.test", &[])).unwrap();
        assert_eq!(got, "live sni=a.sni.test alpn=-");
    }
    assert_eq!(k.metric("ktern_upstream_connect_failures_total"), 0);
}

#[test]
fn passthrough_takes_a_hello_split_into_one_byte_records() {
    let pki = Pki::new("passthrough-split");
    let k = Ktern::start(&pki, "", &passthrough_config(&pki, false, ""));
    let mut conn = passthrough_client(&pki, "a.sni.test", &[b"h2"]);
    let mut first = Vec::new();
    conn.write_tls(&mut first).unwrap();
    // The hello's record(s), re-cut into one-byte handshake records, each
    // its own TCP segment.
    let mut payload = Vec::new();
    let mut rest = &first[..];
    while rest.len() >= 5 {
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        payload.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
    }
    let mut sock = TcpStream::connect(k.addr()).unwrap();
    sock.set_nodelay(true).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    for (i, b) in payload.iter().enumerate() {
        sock.write_all(&[22, 3, 1, 0, 1, *b]).unwrap();
        if i % 64 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let mut s = rustls::StreamOwned::new(conn, sock);
    s.write_all(b"ping").unwrap();
    let mut got = vec![0u8; "a2 sni=a.sni.test alpn=h2\nping".len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, b"a2 sni=a.sni.test alpn=h2\nping");
}

#[test]
fn passthrough_closes_unknown_names_garbage_and_slow_hellos_and_counts_them() {
    let pki = Pki::new("passthrough-refuse");
    let k = Ktern::start(&pki, "", &passthrough_config(&pki, false, ""));
    // No rule, no default: closed before any backend is asked.
    for sni in ["other.test", ""] {
        let err = through_passthrough(&k, passthrough_client(&pki, sni, &[])).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ),
            "{sni}: {err}"
        );
    }
    assert_eq!(k.wait_metric("ktern_passthrough_no_route_total", 2), 2);
    // Not TLS at all.
    let closed = |bytes: &[u8]| {
        let mut sock = TcpStream::connect(k.addr()).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = sock.write_all(bytes);
        let mut b = [0u8; 1];
        let started = Instant::now();
        let gone = match sock.read(&mut b) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        (gone, started.elapsed())
    };
    assert!(closed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").0);
    // A hello that claims 16 MiB.
    assert!(closed(&[22, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff]).0);
    assert_eq!(k.wait_metric("ktern_passthrough_bad_hello_total", 2), 2);
    // A client that connects and closes (a TCP health check) sent no bad
    // hello: counted as a client gone mid-handshake.
    let eof = k.metric("ktern_handshake_failures_eof_total");
    drop(TcpStream::connect(k.addr()).unwrap());
    assert_eq!(
        k.wait_metric("ktern_handshake_failures_eof_total", eof + 1),
        eof + 1
    );
    assert_eq!(k.metric("ktern_passthrough_bad_hello_total"), 2);
    // Half a hello, then silence: closed at hello_timeout (1s).
    let (gone, took) = closed(&[22, 3, 1, 0, 200, 1, 0, 0]);
    assert!(gone && took < Duration::from_secs(8), "{took:?}");
    assert_eq!(k.wait_metric("ktern_passthrough_hello_timeout_total", 1), 1);
    // Others are unaffected.
    assert_eq!(
        through_passthrough(&k, passthrough_client(&pki, "x.wild.test", &[])).unwrap(),
        "wild sni=x.wild.test alpn=-"
    );
}

#[test]
fn passthrough_sends_a_proxy_header_with_the_sni_then_the_hello_untouched() {
    let pki = Pki::new("passthrough-proxy");
    let backend = start_proxy_reading_backend();
    let config = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[listener.route]\nkind = \"passthrough\"\ndefault = \"pp\"\nsend_proxy = \"v2\"\n[upstream.pp]\nbackends = [\"{backend}\"]\n"
    );
    let k = Ktern::start(&pki, "", &config);
    let mut conn = passthrough_client(&pki, "a.sni.test", &[]);
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    // The header the backend got for `before` (a PROXY-in header) and the
    // hello, and the client's address.
    let sent = |k: &Ktern, before: &[u8]| {
        let mut sock = TcpStream::connect(k.addr()).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let client = sock.local_addr().unwrap();
        sock.write_all(&[before, &hello[..]].concat()).unwrap();
        let header = read_proxy_header_echo(&mut sock);
        let mut echoed = vec![0u8; hello.len()];
        sock.read_exact(&mut echoed).unwrap();
        assert!(echoed == hello, "the hello reached the backend changed");
        (header, client)
    };
    let addresses = |header: &[u8]| match ktern::shard::proxy_header::parse(header) {
        ktern::shard::proxy_header::Verdict::Done { addresses, .. } => addresses.unwrap(),
        other => panic!("{other:?}"),
    };
    let (header, client) = sent(&k, b"");
    let got = addresses(&header);
    assert_eq!((got.source, got.destination), (client, k.addr()));
    let parsed = ppp::v2::Header::try_from(&header[..]).unwrap();
    let tlvs: Vec<_> = parsed.tlvs().map(|t| t.unwrap()).collect();
    assert_eq!(
        tlvs.len(),
        1,
        "the SNI alone: ktern saw no TLS it terminated"
    );
    assert_eq!((tlvs[0].kind, &*tlvs[0].value), (0x02, &b"a.sni.test"[..]));
    // Behind a balancer: both addresses of its header go on.
    let k = Ktern::start(
        &pki,
        "",
        &config.replacen(
            "[[listener]]\n",
            "[[listener]]\nproxy_protocol = { trusted = [\"127.0.0.0/8\"] }\n",
            1,
        ),
    );
    let (header, _) = sent(&k, b"PROXY TCP4 192.0.2.7 10.0.0.1 4242 443\r\n");
    let got = addresses(&header);
    assert_eq!(
        (got.source, got.destination),
        (
            "192.0.2.7:4242".parse().unwrap(),
            "10.0.0.1:443".parse().unwrap()
        )
    );
}

/// A `tcp` route to `backend` speaking TLS to it with `tls` (the inside
/// of the route's `tls = { ... }`).
fn upstream_tls_listener(backend: std::net::SocketAddr, tls: &str) -> String {
    format!("{}tls = {{ {tls} }}\n", tcp_listener(backend, ""))
}

/// ktern (`pki`'s certificate) on a `tcp` route with `tls` to `backend`,
/// whose certificate for `localhost` is `backend_pki`'s, trusted as the
/// route's `ca`.
fn ktern_to_tls_backend(pki: &Pki, backend: std::net::SocketAddr, backend_pki: &Pki) -> Ktern {
    let tls = format!(
        "ca = \"{}\", server_name = \"localhost\"",
        backend_pki.cert.display()
    );
    Ktern::start(pki, "", &upstream_tls_listener(backend, &tls))
}

/// Through ktern to a [`start_tls_backend`]: its greeting line, after an
/// echo round trip; an error when ktern closed instead.
fn through_upstream_tls(k: &Ktern, pki: &Pki) -> std::io::Result<String> {
    greeting_after_echo(&mut try_connect(k.addr(), &client_config(&[&pki.der]))?)
}

/// A `tcp` route with `tls` offers its backend the protocol its client
/// chose by ALPN, and none when the client chose none: a backend that
/// must see one (gRPC servers refuse a connection without `h2`) or that
/// speaks several answers in the client's. It was offered none.
#[test]
fn upstream_tls_offers_the_backend_the_clients_protocol() {
    let pki = Pki::new("upstream-tls-alpn");
    let backend_pki = Pki::new("upstream-tls-alpn-backend");
    let backend = start_tls_backend("b", &backend_pki);
    let k = Ktern::start(
        &pki,
        "",
        &format!(
            "{}tls = {{ ca = \"{}\", server_name = \"localhost\" }}\n",
            tcp_listener(backend, "alpn = [\"h2\", \"http/1.1\"]"),
            backend_pki.cert.display()
        ),
    );
    for (offered, seen) in [
        (&[&b"h2"[..]][..], "alpn=h2"),
        (&[b"http/1.1"], "alpn=http/1.1"),
        (&[], "alpn=-"),
    ] {
        let mut cfg = (*client_config(&[&pki.der])).clone();
        cfg.alpn_protocols = offered.iter().map(|p| p.to_vec()).collect();
        let mut c = try_connect(k.addr(), &Arc::new(cfg)).unwrap();
        let greeting = greeting_after_echo(&mut c).unwrap();
        assert_eq!(greeting, format!("b sni=localhost {seen}"));
    }
    // The backend's tickets serve each protocol's connections.
    assert!(k.metric("ktern_upstream_tls_resumed_total") >= 1);
}

#[test]
fn upstream_tls_verifies_the_backend_resumes_and_offloads_both_sides() {
    let pki = Pki::new("upstream-tls");
    let backend_pki = Pki::new("upstream-tls-backend");
    let backend = start_tls_backend("b", &backend_pki);
    let k = ktern_to_tls_backend(&pki, backend, &backend_pki);
    for _ in 0..3 {
        assert_eq!(
            through_upstream_tls(&k, &pki).unwrap(),
            "b sni=localhost alpn=-"
        );
    }
    assert_eq!(k.wait_metric("ktern_upstream_tls_handshakes_total", 3), 3);
    // The backend's TLS 1.3 tickets were kept (read from the kernel's
    // handshake records in the VM): later connections resumed.
    assert!(k.metric("ktern_upstream_tls_resumed_total") >= 1);
    // A 4 MiB echo, byte for byte, both directions through both records.
    let mut c = connect(k.addr(), &pki, ClientOpts::default());
    let data = pattern(4 << 20, 5);
    let mut line = String::new();
    {
        let mut r = std::io::BufReader::new(&mut c);
        c_line(&mut r, &mut line);
    }
    let mut got = vec![0u8; data.len()];
    for (chunk, back) in data.chunks(64 << 10).zip(got.chunks_mut(64 << 10)) {
        c.write_all(chunk).unwrap();
        c.read_exact(back).unwrap();
    }
    assert!(got == data, "the echo differs");
    drop(c);
    if in_vm() {
        // Both sides in the kernel: every client connection and every
        // backend connection offloaded, the kernel's counters agreeing,
        // and the route splicing kTLS to kTLS.
        let n = k.wait_metric("ktern_upstream_ktls_offloaded_total", 4);
        assert_eq!(n, 4);
        assert_eq!(k.metric("ktern_ktls_offloaded_total"), 4);
        for counter in ["TlsTxSw", "TlsRxSw"] {
            let delta = tls_stat_since(&k.tls_stat_at_start, counter);
            assert!(
                delta >= 8,
                "{counter} moved by {delta}: both sides of 4 connections"
            );
        }
        assert!(k.log().contains("paths=(Kernel, Kernel)"), "{}", k.log());
    }
}

/// A backend that sends the certificate of its CA too (a "full chain"
/// file, common): that CA is the bundle's, not an intermediate, and
/// `verify_depth = 1` (the default) takes it, as nginx's
/// `proxy_ssl_verify_depth` does. It was refused as too deep.
#[test]
fn upstream_tls_does_not_count_a_ca_of_the_bundle_the_backend_sends() {
    use rustls::pki_types::{pem::PemObject, PrivateKeyDer};
    let pki = Pki::new("upstream-tls-root-sent");
    let backend_pki = Pki::new("upstream-tls-root-sent-backend");
    // The backend's certificate is self-signed: the bundle's CA itself,
    // sent once as its own and once more as the chain's next.
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![backend_pki.der.clone(), backend_pki.der.clone()],
            PrivateKeyDer::from_pem_file(&backend_pki.key).unwrap(),
        )
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let backend = start_tls_backend_on("b", Arc::new(cfg));
    let k = ktern_to_tls_backend(&pki, backend, &backend_pki);
    assert_eq!(
        through_upstream_tls(&k, &pki).unwrap(),
        "b sni=localhost alpn=-"
    );
    assert_eq!(k.metric("ktern_upstream_tls_failures_total"), 0);
}

/// The first line through `r` (the backend's greeting).
fn c_line(r: &mut impl std::io::BufRead, line: &mut String) {
    r.read_line(line).unwrap();
    assert!(line.ends_with('\n'), "{line:?}");
}

#[test]
fn upstream_tls_refusals_close_the_client_and_are_counted() {
    let pki = Pki::new("upstream-tls-bad");
    let backend_pki = Pki::new("upstream-tls-bad-backend");
    let tls_backend = start_tls_backend("b", &backend_pki);
    let ca = backend_pki.cert.display().to_string();
    // A backend whose (self-signed, trusted) certificate expired in 2001.
    let expired_pki = {
        let dir = pki.dir.join("expired");
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let cert = p.self_signed(&key).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        Pki {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            der: cert.der().clone(),
            dir,
        }
    };
    let expired_backend = start_tls_backend("old", &expired_pki);
    let cases = [
        // Expired (the chain is otherwise fine).
        (
            expired_backend,
            format!(
                "ca = \"{}\", server_name = \"localhost\"",
                expired_pki.cert.display()
            ),
        ),
        // Another name than the certificate's.
        (
            tls_backend,
            format!("ca = \"{ca}\", server_name = \"db.other.test\""),
        ),
        // A CA that did not issue it (ktern's own self-signed one).
        (
            tls_backend,
            format!(
                "ca = \"{}\", server_name = \"localhost\"",
                pki.cert.display()
            ),
        ),
        // The backend's IP address (the default name): not in its SANs.
        (tls_backend, format!("ca = \"{ca}\"")),
        // Plain TCP where TLS is configured (an echo server).
        (
            start_backend(),
            format!("ca = \"{ca}\", server_name = \"localhost\""),
        ),
    ];
    for (i, (backend, tls)) in cases.iter().enumerate() {
        let k = Ktern::start(&pki, "", &upstream_tls_listener(*backend, tls));
        let got = through_upstream_tls(&k, &pki);
        assert!(got.is_err(), "case {i} ({tls}) went through: {got:?}");
        assert_eq!(
            k.wait_metric("ktern_upstream_tls_failures_total", 1),
            1,
            "case {i}"
        );
        assert!(
            k.log().contains("upstream TLS handshake failed"),
            "case {i}"
        );
    }
    // verify_name = false: the other name is accepted (the chain still
    // verified).
    let k = Ktern::start(
        &pki,
        "",
        &upstream_tls_listener(
            tls_backend,
            &format!("ca = \"{ca}\", server_name = \"db.other.test\", verify_name = false"),
        ),
    );
    assert_eq!(
        through_upstream_tls(&k, &pki).unwrap(),
        "b sni=db.other.test alpn=-"
    );
}

/// Issue 13's guard on the connection path, in what does not jitter: the
/// syscalls ktern makes per proxied TLS connection on a `tcp` route
/// (accept, handshake, backend connect, one echoed byte, both closes),
/// counted over sequential connections like the keep-alive request's in
/// `tests/http.rs`. Host only: the kTLS VM has no strace.
#[test]
fn a_proxied_connection_costs_a_bounded_number_of_syscalls() {
    if in_vm() {
        eprintln!("skipped in the VM: no strace there; the host run is the guard");
        return;
    }
    let pki = Pki::new("connsyscalls");
    let backend = start_backend();
    let traced = Traced::start(&pki, "cpus = [0]", &tcp_listener(backend, ""));
    let addr = traced.ktern.addr();
    let one = || {
        let mut c = connect(addr, &pki, ClientOpts::default());
        c.write_all(b"ECHO\nx").unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        // close_notify and FIN; ktern then closes the backend's side, the
        // backend closes, and ktern ends the client's stream: each
        // connection is wholly over before the next one starts.
        c.conn.send_close_notify();
        c.conn.write_tls(&mut c.sock).unwrap();
        c.sock.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(read_to_close_notify(&mut c).is_empty());
    };
    for _ in 0..5 {
        one();
    }
    let conns: u64 = 200;
    let calls = traced.count(|| {
        for _ in 0..conns {
            one();
        }
    });
    let total: u64 = calls.values().sum();
    eprintln!(
        "{conns} proxied connections: {total} syscalls, {:.2} per connection: {calls:?}",
        total as f64 / conns as f64
    );
    // Measured 2026-12-02, per connection: exactly 10 outside the ring
    // (2 `ioctl(FIONBIO)`, one per socket, where socket2's `fcntl` pair
    // took 4; 4 `recvfrom`: the readiness-driven reads of each side's
    // bytes and ends; 1 `setsockopt(TCP_NODELAY)`, the backend's: the
    // client's comes from the listener; 2 `shutdown`; the backend's
    // `socket`) and 10.3-11.9 `io_uring_enter` (accept, the
    // handshake's flights, connect, the echo, the closes: how many wait
    // together depends on timing and on what else runs, hence the margin;
    // the exact count outside the ring is the sharp half of this guard).
    // Only the shard's thread is counted (CI once failed this guard on 16
    // `poll` and a thread start elsewhere in the process); the slack covers
    // the window's edges and the shard's own timers. The `ring` build adds
    // 9 `getrandom` per connection (ring's SystemRandom asks the kernel for
    // every random value of the handshake; aws-lc draws from its own DRBG:
    // none), bounded on their own.
    let enters = calls.get("io_uring_enter").copied().unwrap_or(0);
    let random = calls.get("getrandom").copied().unwrap_or(0);
    let others = total - enters - random;
    assert!(
        others <= 10 * conns + 20 && enters <= 16 * conns && random <= 9 * conns + 5,
        "{total} syscalls for {conns} connections, {enters} io_uring_enter: {calls:?}"
    );
    assert!(
        enters >= conns,
        "the trace missed the shard's ring: {calls:?}"
    );
}
