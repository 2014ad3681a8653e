//! Criterion: the sans-IO handshake driver against an in-memory rustls
//! client, no sockets. Measures server + client CPU per full TLS 1.3
//! handshake (X25519, ECDSA P-256), and the server share alone by timing only
//! the driver's calls. `cargo bench --bench handshake`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use ktern::handshake::{self, Handshake, Step};
use rustls::pki_types::ServerName;

#[path = "../tools/anycert.rs"]
mod anycert;

/// One full handshake; returns the time spent inside the server driver.
fn handshake(server: &Arc<rustls::ServerConfig>, client: &Arc<rustls::ClientConfig>) -> Duration {
    let mut c =
        rustls::ClientConnection::new(client.clone(), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let t = Instant::now();
    let mut hs = Handshake::new(server.clone()).unwrap();
    let mut server_time = t.elapsed();
    loop {
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let t = Instant::now();
        if !wire.is_empty() {
            hs.handle_input(&wire).unwrap();
        }
        let step = hs.poll().unwrap();
        let out = if step == Step::Transmit {
            Some(hs.take_output())
        } else {
            None
        };
        server_time += t.elapsed();
        match (step, out) {
            (Step::Done, _) => {
                let t = Instant::now();
                drop(std::hint::black_box(hs.finish()));
                return server_time + t.elapsed();
            }
            (Step::Transmit, Some(out)) => {
                let mut rd: &[u8] = &out;
                while !rd.is_empty() {
                    c.read_tls(&mut rd).unwrap();
                }
                c.process_new_packets().unwrap();
                hs.output_sent(out);
            }
            (Step::Read(_), _) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn bench(cr: &mut Criterion) {
    let server = handshake::self_signed_config().unwrap();
    let client = anycert::full_handshake_client();
    cr.bench_function("tls13_full_handshake_client_and_server", |b| {
        b.iter(|| handshake(&server, &client))
    });
    cr.bench_function("tls13_full_handshake_server_driver_only", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| handshake(&server, &client)).sum())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
