//! PROXY protocol in (issue 10): a load balancer's header carries the
//! client address, trusted sources only; hostile or slow headers close the
//! connection, counted, and other connections are unaffected.

mod common;

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::http::{exchange, http_config, read_response, start_http_backend, ANY_TO_A};
use common::*;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};

/// A ktern with an `http` route whose listener expects PROXY headers from
/// `trusted`.
fn ktern(tag: &str, trusted: &str) -> (Pki, Ktern) {
    let pki = Pki::new(tag);
    let backend = start_http_backend("a");
    let config = http_config(&[("a", backend.addr)], ANY_TO_A, "").replacen(
        "[[listener]]\n",
        &format!("[[listener]]\nproxy_protocol = {{ trusted = [{trusted}], timeout = \"1s\" }}\n"),
        1,
    );
    let k = Ktern::start(&pki, "", &config);
    (pki, k)
}

/// A connection that sends `header`, then TLS; with the client's own
/// address.
fn tls_after(k: &Ktern, pki: &Pki, header: &[u8]) -> (Client, std::net::SocketAddr) {
    let mut sock = TcpStream::connect(k.addr()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let client = sock.local_addr().unwrap();
    sock.write_all(header).unwrap();
    let conn = ClientConnection::new(
        client_config(&[&pki.der]),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    (StreamOwned::new(conn, sock), client)
}

/// `header`, then TLS on the same connection and `GET /head`: the request
/// head the backend saw.
fn request_after(k: &Ktern, pki: &Pki, header: &[u8]) -> String {
    let (mut tls, _) = tls_after(k, pki, header);
    tls.write_all(b"GET /head HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let resp = read_response(&mut BufReader::new(&mut tls), false).unwrap();
    assert_eq!(resp.status, 200);
    String::from_utf8(resp.body).unwrap()
}

/// A v2 header: PROXY, TCP over IPv4, from `src:sport`.
fn v2(src: [u8; 4], sport: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&443u16.to_be_bytes());
    h
}

/// Whether ktern closed the connection after `bytes` (and maybe a wait)
/// without answering (a read that times out is not a close).
fn closed_after(k: &Ktern, bytes: &[u8]) -> bool {
    let mut sock = TcpStream::connect(k.addr()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = sock.write_all(bytes);
    let mut b = [0u8; 1];
    match sock.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn the_headers_client_address_is_the_clients_everywhere() {
    let (pki, k) = ktern("pp-ok", "\"127.0.0.0/8\"");
    let seen = request_after(&k, &pki, b"PROXY TCP4 192.0.2.7 10.0.0.1 4242 443\r\n");
    assert!(seen.contains("X-Forwarded-For: 192.0.2.7\r\n"), "{seen}");
    let seen = request_after(&k, &pki, &v2([198, 51, 100, 9], 5555));
    assert!(seen.contains("X-Forwarded-For: 198.51.100.9\r\n"), "{seen}");
    // UNKNOWN (and LOCAL): the connection's own address stands.
    let seen = request_after(&k, &pki, b"PROXY UNKNOWN\r\n");
    assert!(seen.contains("X-Forwarded-For: 127.0.0.1\r\n"), "{seen}");
    assert_eq!(k.wait_metric("ktern_proxy_protocol_headers_total", 3), 3);
    assert_offloaded_in_vm(&k);
}

/// `max_conns_per_client` on a PROXY listener counts the header's
/// address, not the balancer's (every connection here comes from
/// 127.0.0.1): a client's second connection is closed, another client
/// behind the same balancer is served, and headers that carry no address
/// (UNKNOWN, as LOCAL health checks) are not counted.
#[test]
fn max_conns_per_client_counts_the_headers_address() {
    let pki = Pki::new("pp-per-client");
    let backend = start_http_backend("a");
    let config = http_config(&[("a", backend.addr)], ANY_TO_A, "").replacen(
        "[[listener]]\n",
        "[[listener]]\nmax_conns_per_client = 1\nproxy_protocol = { trusted = [\"127.0.0.0/8\"], timeout = \"1s\" }\n",
        1,
    );
    let k = Ktern::start(&pki, "", &config);
    let served = |header: &[u8]| {
        let (mut c, _) = tls_after(&k, &pki, header);
        while c.conn.is_handshaking() {
            c.conn.complete_io(&mut c.sock).unwrap();
        }
        c
    };
    let _first = served(&v2([192, 0, 2, 7], 1000));
    assert!(closed_after(&k, &v2([192, 0, 2, 7], 1001)));
    assert_eq!(k.metric("ktern_connections_refused_per_client_total"), 1);
    let _other = served(&v2([192, 0, 2, 8], 1002));
    let _unknown = [served(b"PROXY UNKNOWN\r\n"), served(b"PROXY UNKNOWN\r\n")];
    assert_eq!(k.metric("ktern_connections_refused_per_client_total"), 1);
}

#[test]
fn untrusted_sources_and_bad_or_slow_headers_are_closed_and_counted() {
    let (_pki, k) = ktern("pp-untrusted", "\"10.9.9.0/24\"");
    assert!(closed_after(
        &k,
        b"PROXY TCP4 192.0.2.7 10.0.0.1 4242 443\r\n"
    ));
    assert_eq!(k.wait_metric("ktern_proxy_protocol_untrusted_total", 1), 1);
    assert_eq!(k.metric("ktern_proxy_protocol_headers_total"), 0);
    // Anyone can send these: every one counted, at most a line per shard
    // per 10 s (a line each, written on the shard's thread, was a flood).
    for _ in 0..200 {
        drop(TcpStream::connect(k.addr()).unwrap());
    }
    assert_eq!(
        k.wait_metric("ktern_proxy_protocol_untrusted_total", 201),
        201
    );
    let lines = k
        .log()
        .lines()
        .filter(|l| l.contains("untrusted address") && !l.contains("DEBUG"))
        .count();
    assert!(
        (1..=2).contains(&lines),
        "{lines} lines for 201 connections"
    );

    let (pki, k) = ktern("pp-bad", "\"127.0.0.1\"");
    let mut bad_signature = v2([1, 2, 3, 4], 1);
    bad_signature[3] = b'X';
    let mut wrong_length = v2([1, 2, 3, 4], 1);
    wrong_length[15] = 4; // fewer bytes than TCP over IPv4 needs
    let mut bad_version = v2([1, 2, 3, 4], 1);
    bad_version[12] = 0x31;
    for bad in [
        &b"PROXY TCP4 banana 10.0.0.1 1 2\r\n"[..],
        // A line that ends but is cut short: bad at once, not a timeout.
        b"PROXY TCP4 192.0.2.7\r\n",
        &bad_signature,
        &wrong_length,
        &bad_version,
        // No header at all: a TLS ClientHello where it should be.
        &[22, 3, 1, 0, 5, 1, 0, 0, 1, 0],
    ] {
        assert!(closed_after(&k, bad), "{bad:?}");
    }
    assert_eq!(k.wait_metric("ktern_proxy_protocol_invalid_total", 6), 6);
    assert_eq!(k.metric("ktern_proxy_protocol_timeout_total"), 0);
    assert!(
        k.log().contains("PROXY protocol: bad header: v2: "),
        "{}",
        k.log()
    );
    // Half a header, then nothing: closed at the 1 s timeout.
    assert!(closed_after(&k, b"PROXY TCP4 192.0.2."));
    assert_eq!(k.wait_metric("ktern_proxy_protocol_timeout_total", 1), 1);
    // Trailing garbage after a good header is the TLS stream's problem:
    // the handshake fails with an alert, not the header.
    assert!(!closed_after(
        &k,
        b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2\r\nGARBAGE!"
    ));
    assert_eq!(k.wait_metric("ktern_handshake_failures_tls_total", 1), 1);
    // Other connections were never affected.
    let seen = request_after(&k, &pki, b"PROXY TCP4 192.0.2.8 10.0.0.1 1 2\r\n");
    assert!(seen.contains("X-Forwarded-For: 192.0.2.8\r\n"), "{seen}");
    assert!(
        k.log().contains("PROXY protocol: bad header"),
        "{}",
        k.log()
    );
    assert_offloaded_in_vm(&k);
}

#[test]
fn the_access_log_uses_the_headers_address() {
    let pki = Pki::new("pp-log");
    let backend = start_http_backend("a");
    let log = pki.dir.join("access.log");
    let config = format!(
        "[access_log]\npath = \"{}\"\n{}",
        log.display(),
        http_config(&[("a", backend.addr)], ANY_TO_A, "").replacen(
            "[[listener]]\n",
            "[[listener]]\nproxy_protocol = { trusted = [\"127.0.0.1\"] }\n",
            1
        )
    );
    let k = Ktern::start(&pki, "", &config);
    request_after(&k, &pki, b"PROXY TCP6 2001:db8::5 2001:db8::1 7 443\r\n");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.starts_with("2001:db8::5 ") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "access log: {text:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the backend saw: the PROXY header's addresses, and the bytes
/// after it (`hello` echoed); and the client's own address. `before`:
/// bytes sent ahead of TLS (a PROXY-in header).
fn through(
    k: &Ktern,
    pki: &Pki,
    before: &[u8],
) -> (
    Option<ktern::shard::proxy_header::Addresses>,
    std::net::SocketAddr,
) {
    let (mut tls, client) = tls_after(k, pki, before);
    tls.write_all(b"hello").unwrap();
    let header = read_proxy_header_echo(&mut tls);
    let len = header.len();
    let mut echo = [0u8; 5];
    tls.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"hello");
    let addresses = match ktern::shard::proxy_header::parse(&header) {
        ktern::shard::proxy_header::Verdict::Done { addresses, len: n } => {
            assert_eq!(n, len);
            addresses
        }
        other => panic!("the backend got no PROXY header: {other:?} {header:?}"),
    };
    (addresses, client)
}

#[test]
fn send_proxy_tells_the_backend_the_clients_address_in_v1_and_v2() {
    let backend = start_proxy_reading_backend();
    for (tag, version) in [("pp-out-v1", "v1"), ("pp-out-v2", "v2")] {
        let pki = Pki::new(tag);
        let k = Ktern::start(
            &pki,
            "",
            &tcp_listener(backend, "").replace(
                "kind = \"tcp\"\n",
                &format!("kind = \"tcp\"\nsend_proxy = \"{version}\"\n"),
            ),
        );
        let (addresses, client) = through(&k, &pki, b"");
        let want = ktern::shard::proxy_header::Addresses {
            source: client,
            destination: k.addr(),
        };
        assert_eq!(addresses, Some(want), "{version}");
        assert_offloaded_in_vm(&k);
    }
    // Behind a balancer: the PROXY-in header's client and destination go
    // on (HAProxy's accept-proxy with send-proxy), not ktern's own
    // address behind the balancer.
    let pki = Pki::new("pp-in-out");
    let k = Ktern::start(
        &pki,
        "",
        &tcp_listener(backend, "proxy_protocol = { trusted = [\"127.0.0.0/8\"] }")
            .replace("kind = \"tcp\"\n", "kind = \"tcp\"\nsend_proxy = \"v2\"\n"),
    );
    let (addresses, _) = through(&k, &pki, b"PROXY TCP4 192.0.2.7 10.0.0.1 4242 443\r\n");
    let want = ktern::shard::proxy_header::Addresses {
        source: "192.0.2.7:4242".parse().unwrap(),
        destination: "10.0.0.1:443".parse().unwrap(),
    };
    assert_eq!(addresses, Some(want));
}

/// `send_proxy` on an `http` upstream group, with nginx as the backend
/// (`listen … proxy_protocol`, answering and logging
/// `$proxy_protocol_addr`): each client's requests reach nginx on backend
/// connections that carry that client's address, reused across its
/// keep-alive requests and never by another client; behind a trusted
/// balancer, its PROXY-in header's client goes on; health checks send a
/// header naming no client. Then the same nginx behind a `tcp` route.
#[test]
fn http_upstreams_send_each_clients_address_to_nginx() {
    let Some(nginx) = NginxProxyBackend::start("pp-http") else {
        return;
    };
    let answer = |c: &mut Client| -> (String, String) {
        let r = exchange(c, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
        assert_eq!(r.status, 200, "{r:?}");
        let body = String::from_utf8(r.body).unwrap();
        let (pp, conn) = body.trim().split_once(' ').unwrap();
        (pp.to_string(), conn.to_string())
    };
    for (version, proxy_in) in [("v1", false), ("v2", true)] {
        let pki = Pki::new(&format!("pp-http-{version}"));
        let mut config = http_config(&[("a", nginx.addr)], ANY_TO_A, "").replace(
            "response_timeout = \"1s\"\n",
            &format!(
                "response_timeout = \"1s\"\nsend_proxy = \"{version}\"\n\
                 health = {{ interval = \"100ms\", timeout = \"30s\", rise = 1, fall = 1 }}\n"
            ),
        );
        if proxy_in {
            config = config.replacen(
                "[[listener]]\n",
                "[[listener]]\nproxy_protocol = { trusted = [\"127.0.0.0/8\"] }\n",
                1,
            );
        }
        let k = Ktern::start(&pki, "cpus = [0]", &config);
        // A check passes only if nginx takes its header.
        assert_health_checks_pass(&k);
        // Client `n` and the addresses nginx must report for it: behind a
        // balancer, both as its PROXY-in header said them.
        let client = |n: u16| -> (Client, String) {
            if proxy_in {
                let header = format!("PROXY TCP4 192.0.2.{n} 10.0.0.1 {} 443\r\n", 4000 + n);
                let (tls, _) = tls_after(&k, &pki, header.as_bytes());
                (tls, format!("pp=192.0.2.{n}:{}>10.0.0.1:443", 4000 + n))
            } else {
                let (tls, addr) = tls_after(&k, &pki, b"");
                (
                    tls,
                    format!("pp={}:{}>{}", addr.ip(), addr.port(), k.addr()),
                )
            }
        };
        let (mut a, a_want) = client(1);
        let (mut b, b_want) = client(2);
        let (a_pp, a_conn) = answer(&mut a);
        assert_eq!(a_pp, a_want, "{version}");
        let (b_pp, b_conn) = answer(&mut b);
        assert_eq!(b_pp, b_want, "{version}");
        assert_ne!(
            a_conn, b_conn,
            "{version}: two clients on one backend connection"
        );
        // Keep-alive: the same backend connection, still saying `a`.
        for _ in 0..3 {
            assert_eq!(answer(&mut a), (a_pp.clone(), a_conn.clone()), "{version}");
        }
        assert_eq!(answer(&mut b), (b_pp, b_conn.clone()), "{version}");
        drop(b);
        // A new client gets a backend connection of its own, not `b`'s.
        let (mut c, c_want) = client(3);
        let (c_pp, c_conn) = answer(&mut c);
        assert_eq!(c_pp, c_want, "{version}");
        assert_ne!(
            c_conn, b_conn,
            "{version}: a closed client's backend connection reused"
        );
        let log = std::fs::read_to_string(&nginx.access_log).unwrap();
        assert!(
            log.contains(&a_want) && log.contains(&c_want),
            "{version}: {log}"
        );
        assert_offloaded_in_vm(&k);
    }
    // A `tcp` route: the client's HTTP goes through unread, after the header.
    let pki = Pki::new("pp-tcp-nginx");
    let k = Ktern::start(
        &pki,
        "",
        &tcp_listener(nginx.addr, "")
            .replace("kind = \"tcp\"\n", "kind = \"tcp\"\nsend_proxy = \"v1\"\n"),
    );
    let (mut tls, addr) = tls_after(&k, &pki, b"");
    let (pp, _) = answer(&mut tls);
    assert_eq!(pp, format!("pp={}:{}>{}", addr.ip(), addr.port(), k.addr()));
}
