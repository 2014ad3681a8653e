//! Criterion: HTTP/1.1 request-head parsing and forwarding rewrite, on a
//! typical browser request (about 600 bytes, 12 fields); body scanning;
//! and formatting that request's access line (combined and JSON).
//! `cargo bench --bench http`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ktern::metrics::access;
use ktern::proxy::http::{body, head, rewrite};
use std::time::{Duration, SystemTime};

const REQUEST: &[u8] = b"GET /static/app.js?v=3 HTTP/1.1\r\n\
Host: www.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
Accept: */*\r\n\
Accept-Language: en-US,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Referer: https://www.example.com/\r\n\
Connection: keep-alive\r\n\
Cookie: session=0123456789abcdef0123456789abcdef; theme=dark\r\n\
Sec-Fetch-Dest: script\r\n\
Sec-Fetch-Mode: no-cors\r\n\
Sec-Fetch-Site: same-origin\r\n\
X-Forwarded-For: 203.0.113.9\r\n\r\n";

fn bench(c: &mut Criterion) {
    let limits = head::Limits::default();
    let mut g = c.benchmark_group("http_head");
    g.throughput(Throughput::Bytes(REQUEST.len() as u64));
    g.bench_function("parse_request", |b| {
        b.iter(|| {
            head::parse_request(std::hint::black_box(REQUEST), &limits)
                .unwrap()
                .unwrap()
        })
    });
    let parsed = head::parse_request(REQUEST, &limits).unwrap().unwrap();
    let fwd = rewrite::Forwarding {
        client: "198.51.100.4:50000".parse().unwrap(),
        trusted: false,
        x_forwarded: true,
        forwarded: true,
        client_cert: None,
    };
    let mut out = Vec::with_capacity(1024);
    g.bench_function("rewrite_request", |b| {
        b.iter(|| {
            out.clear();
            rewrite::request(std::hint::black_box(&parsed), &fwd, &mut out);
        })
    });
    g.finish();

    let chunked: Vec<u8> = (0..64)
        .flat_map(|_| {
            b"400\r\n"
                .iter()
                .copied()
                .chain([b'x'; 1024])
                .chain(*b"\r\n")
        })
        .chain(*b"0\r\n\r\n")
        .collect();
    let mut g = c.benchmark_group("http_body");
    g.throughput(Throughput::Bytes(chunked.len() as u64));
    g.bench_function("scan_chunked_64k", |b| {
        b.iter(|| {
            let mut s = body::BodyScanner::new(body::Framing::Chunked);
            s.scan(std::hint::black_box(&chunked)).unwrap()
        })
    });
    g.finish();

    let tls = ktern::handshake::TlsInfo {
        sni: Some("www.example.com".into()),
        version: Some(rustls::ProtocolVersion::TLSv1_3),
        suite: Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
        kernel: true,
        alpn_h2: false,
        alpn: None,
        resumed: false,
        client_auth: false,
        client: None,
    };
    let record = access::Record {
        time: SystemTime::now(),
        client: "198.51.100.4:50000".parse().unwrap(),
        tls: &tls,
        kernel: true,
        method: parsed.method(),
        host: parsed.host().unwrap_or(""),
        target: parsed.target(),
        protocol: "HTTP/1.1",
        status: 200,
        bytes_in: REQUEST.len() as u64,
        bytes_out: 1100,
        referer: parsed.values("referer").next(),
        user_agent: parsed.values("user-agent").next(),
        upstream: Some("10.0.0.7:8080".parse().unwrap()),
        total: Duration::from_micros(3_250),
        upstream_time: Some(Duration::from_micros(2_100)),
    };
    let mut g = c.benchmark_group("access_line");
    for (name, format) in [
        ("combined", access::Format::Combined),
        ("json", access::Format::Json),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                access::format(format, std::hint::black_box(&record), &mut out);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
