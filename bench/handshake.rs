//! Criterion: the sans-IO handshake driver against an in-memory rustls
//! client, no sockets. Measures server + client CPU per full TLS 1.3
//! handshake (X25519, ECDSA P-256), and the server share alone by timing only
//! the driver's calls. `cargo bench --bench handshake`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use ktern::handshake;

#[path = "../tools/anycert.rs"]
mod anycert;

/// One full handshake; returns the time spent inside the server driver.
fn handshake(server: &handshake::ServerTls, client: &Arc<rustls::ClientConfig>) -> Duration {
    handshake::memory::timed_handshake(server, client, "localhost")
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
