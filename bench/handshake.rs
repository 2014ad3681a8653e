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
fn handshake(server: &handshake::ServerTls, client: &Arc<rustls::ClientConfig>) -> Duration {
    let mut c =
        rustls::ClientConnection::new(client.clone(), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let t = Instant::now();
    let mut hs = Handshake::new(server).unwrap();
    let mut server_time = t.elapsed();
    let step = handshake::memory::pump(&mut c, &mut hs, 0, &mut server_time);
    assert_eq!(step, Step::Done);
    let t = Instant::now();
    drop(std::hint::black_box(hs.finish()));
    server_time + t.elapsed()
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
