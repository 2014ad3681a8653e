//! Certificates at scale: a full TLS 1.3 handshake (server driver CPU,
//! in memory, no sockets) against a listener with one certificate and
//! against one with 10,000, side by side; and the memory each loaded
//! certificate costs (RSS of the loaded config and its store, per
//! certificate). `cargo bench --bench certs`.
//!
//! The two configs are loaded from files by `Config::load`, as `ktern run`
//! loads them. Handshakes alternate between the two stores so that drift
//! of this machine's speed falls on both alike; the summary line gives
//! the ratio (the bound: within 5%).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use ktern::config::Config;
use ktern::handshake::memory::timed_handshake as handshake;
use ktern::handshake::{self, ServerTls};

#[path = "../tools/anycert.rs"]
mod anycert;

const MANY: usize = 10_000;

/// Resident memory of this process, bytes (`/proc/self/statm`).
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Writes `n` certificates (`host{i}.test`, ECDSA P-256) and a config
/// listing them; returns the config's path.
fn write_config(dir: &std::path::Path, n: usize) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut toml = String::from("[[listener]]\naddress = \"127.0.0.1:0\"\n");
    for i in 0..n {
        let (cert, key) = ktern::builtin::self_signed(&[&format!("host{i}.test")]).unwrap();
        let (c, k) = (dir.join(format!("{i}.crt")), dir.join(format!("{i}.key")));
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        toml += &format!(
            "[[listener.certificate]]\ncert = \"{}\"\nkey = \"{}\"\n",
            c.display(),
            k.display()
        );
    }
    toml += "[listener.route]\nkind = \"tcp\"\nbackends = [\"127.0.0.1:9\"]\n";
    let path = dir.join("ktern.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// The config and its store, and the RSS they added.
fn load(path: &std::path::Path) -> (ServerTls, Config, usize) {
    let before = rss();
    let config = Config::load(path).unwrap();
    let l = &config.listeners[0];
    let tls =
        handshake::server_config(l, &handshake::cert_store(l), &handshake::ticketer()).unwrap();
    (tls, config, rss().saturating_sub(before))
}

fn bench(cr: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("ktern-bench-certs-{}", std::process::id()));
    let one_path = write_config(&dir.join("one"), 1);
    let many_path = write_config(&dir.join("many"), MANY);
    let (one, _one_config, _) = load(&one_path);
    let (many, _many_config, grown) = load(&many_path);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "memory: {MANY} certificates loaded added {:.1} MiB RSS, {} bytes per certificate",
        grown as f64 / (1 << 20) as f64,
        grown / MANY
    );
    let client = anycert::full_handshake_client();
    // Side by side, interleaved: the same number of handshakes on each,
    // each on a name of its store (a different one every time on 10,000).
    let rounds = 2_000;
    let (mut t_one, mut t_many) = (Duration::ZERO, Duration::ZERO);
    for i in 0..rounds {
        t_one += handshake(&one, &client, "host0.test");
        t_many += handshake(&many, &client, &format!("host{}.test", (i * 7919) % MANY));
    }
    println!(
        "server driver CPU per full handshake: 1 certificate {:.1} us, {MANY} certificates {:.1} us, ratio {:.3} ({rounds} each, interleaved)",
        t_one.as_secs_f64() * 1e6 / rounds as f64,
        t_many.as_secs_f64() * 1e6 / rounds as f64,
        t_many.as_secs_f64() / t_one.as_secs_f64()
    );
    cr.bench_function("full_handshake_server_1_certificate", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| handshake(&one, &client, "host0.test"))
                .sum()
        })
    });
    let mut i = 0usize;
    cr.bench_function("full_handshake_server_10000_certificates", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    i = (i + 7919) % MANY;
                    handshake(&many, &client, &format!("host{i}.test"))
                })
                .sum()
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
