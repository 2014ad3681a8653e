//! `ktern-load`: the project's load generator and benchmark backend.
//!
//! Every mode is bounded in count and time and stops by itself.
//!
//! - `handshakes`: full TLS 1.3 handshakes (no resumption, X25519 only) from
//!   N threads for a fixed time; each connection sends one byte and waits
//!   for it to come back, so the server has finished its side too.
//! - `idle`: opens N TLS connections, completes each handshake, holds them
//!   all open for a while (for RSS-per-connection measurements).
//! - `download`: fetches everything a source backend sends, K times.
//! - `backend`: a plain TCP backend: `echo` echoes; `source` sends N bytes
//!   to each connection and closes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};

#[derive(Parser)]
#[command(
    name = "ktern-load",
    about = "Bounded load generator for ktern benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Full TLS 1.3 handshakes for `--seconds` from `--threads` threads.
    Handshakes {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 4)]
        threads: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Hard cap on handshakes, whatever the time.
        #[arg(long, default_value_t = 1_000_000)]
        max: u64,
    },
    /// Open `--conns` TLS connections and hold them for `--hold` seconds.
    Idle {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        #[arg(long, default_value_t = 10)]
        hold: u64,
    },
    /// Read everything the (source) backend sends through the server, `--times` times.
    Download {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        times: u32,
        /// Expected bytes per download (checked).
        #[arg(long)]
        bytes: u64,
    },
    /// Starts an echo backend and `ktern run -c CONFIG` (whose first listener
    /// must route to `--backend`), opens `--conns` idle TLS connections and
    /// prints ktern's RSS growth per connection. For the VM (kTLS) and host.
    Rss {
        #[arg(long)]
        ktern: std::path::PathBuf,
        #[arg(long)]
        config: std::path::PathBuf,
        #[arg(long, default_value = "127.0.0.1:19001")]
        backend: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
    },
    /// A plain TCP backend for the benchmarks (runs for `--seconds`).
    Backend {
        #[arg(long)]
        listen: SocketAddr,
        /// `echo`, or `source` (sends `--bytes` then closes).
        #[arg(long, default_value = "echo")]
        kind: String,
        #[arg(long, default_value_t = 0)]
        bytes: u64,
        #[arg(long, default_value_t = 600)]
        seconds: u64,
    },
}

#[path = "anycert.rs"]
mod anycert;

fn client_config() -> Arc<ClientConfig> {
    anycert::full_handshake_client()
}

type Tls = rustls::StreamOwned<ClientConnection, TcpStream>;

fn connect(cfg: &Arc<ClientConfig>, addr: SocketAddr) -> std::io::Result<Tls> {
    let name = ServerName::try_from("localhost").expect("valid name");
    let conn = ClientConnection::new(cfg.clone(), name).map_err(std::io::Error::other)?;
    let sock = TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

fn handshakes(addr: SocketAddr, threads: usize, seconds: u64, max: u64) {
    let cfg = client_config();
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (cfg, done, failed, stop) =
                (cfg.clone(), done.clone(), failed.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("valid histogram");
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let t = Instant::now();
                    let ok = connect(&cfg, addr).and_then(|mut tls| {
                        // One byte through the echo backend: the server has
                        // finished its half of the handshake and proxied.
                        tls.write_all(b"x")?;
                        let mut b = [0u8; 1];
                        tls.read_exact(&mut b)?;
                        tls.conn.send_close_notify();
                        let _ = tls.flush();
                        Ok(())
                    });
                    match ok {
                        Ok(()) => {
                            let _ = hist.record(t.elapsed().as_micros() as u64);
                            if done.fetch_add(1, Ordering::Relaxed) + 1 >= max {
                                stop.store(true, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                hist
            })
        })
        .collect();
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("valid histogram");
    for w in workers {
        if let Ok(h) = w.join() {
            let _ = hist.add(h);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    println!(
        "handshakes={n} failed={} seconds={secs:.2} rate={:.0}/s p50_us={} p99_us={}",
        failed.load(Ordering::Relaxed),
        n as f64 / secs,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99)
    );
}

fn idle(addr: SocketAddr, conns: usize, hold: u64) {
    let cfg = client_config();
    let mut open = Vec::with_capacity(conns);
    let start = Instant::now();
    for i in 0..conns {
        match connect(&cfg, addr) {
            Ok(mut tls) => {
                // Make the server finish the handshake and hand the keys over.
                if tls.write_all(b"x").is_ok() && tls.read_exact(&mut [0u8; 1]).is_ok() {
                    open.push(tls);
                }
            }
            Err(e) => {
                eprintln!("connection {i} failed: {e}");
                break;
            }
        }
    }
    println!(
        "open={} seconds={:.1}",
        open.len(),
        start.elapsed().as_secs_f64()
    );
    let _ = std::io::stdout().flush();
    std::thread::sleep(Duration::from_secs(hold));
    println!("closing");
}

fn download(addr: SocketAddr, times: u32, bytes: u64) {
    let cfg = client_config();
    let start = Instant::now();
    let mut buf = vec![0u8; 256 << 10];
    for _ in 0..times {
        let mut tls = match connect(&cfg, addr) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("connect failed: {e}");
                std::process::exit(1);
            }
        };
        let mut got = 0u64;
        loop {
            match tls.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => {
                    eprintln!("read failed after {got} bytes: {e}");
                    std::process::exit(1);
                }
            }
        }
        if got != bytes {
            eprintln!("expected {bytes} bytes, got {got}");
            std::process::exit(1);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "downloads={times} bytes={} seconds={secs:.2} MBps={:.1}",
        bytes * times as u64,
        (bytes * times as u64) as f64 / secs / 1e6
    );
}

/// One thread, one monoio runtime (epoll driver, so it runs anywhere), one
/// task per connection: 10,000 idle connections cost little.
fn backend(listen: SocketAddr, kind: String, bytes: u64, seconds: u64) {
    use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(seconds));
        std::process::exit(0);
    });
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = monoio::net::TcpListener::bind(listen).expect("bind backend");
        let payload: std::rc::Rc<Vec<u8>> = std::rc::Rc::new(vec![0x5a; 1 << 20]);
        while let Ok((mut conn, _)) = listener.accept().await {
            let _ = conn.set_nodelay(true);
            let source = kind == "source";
            let payload = payload.clone();
            monoio::spawn(async move {
                if source {
                    let mut left = bytes;
                    while left > 0 {
                        let n = left.min(payload.len() as u64) as usize;
                        let chunk = payload[..n].to_vec();
                        let (res, _) = conn.write_all(chunk).await;
                        if res.is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                } else {
                    let mut buf = Vec::with_capacity(16384);
                    loop {
                        let (res, b) = conn.read(buf).await;
                        match res {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {
                                let (res, b) = conn.write_all(b).await;
                                if res.is_err() {
                                    break;
                                }
                                buf = b;
                                buf.clear();
                            }
                        }
                    }
                }
                use monoio::io::AsyncWriteRent;
                let _ = conn.shutdown().await;
            });
        }
    });
}

fn rss(
    ktern_bin: std::path::PathBuf,
    config: std::path::PathBuf,
    backend_addr: SocketAddr,
    conns: usize,
) {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    // Root in the VM may raise the hard limit; elsewhere keep what we have.
    let _ = ktern::sys::set_nofile_limit(200_000);
    let _ = ktern::sys::raise_nofile_limit();
    let me = std::env::current_exe().expect("own path");
    let mut backend = Command::new(me)
        .args([
            "backend",
            "--listen",
            &backend_addr.to_string(),
            "--seconds",
            "900",
        ])
        .spawn()
        .expect("start backend");
    let mut server = Command::new(&ktern_bin)
        .args(["run", "-c"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start ktern");
    let stdout = std::io::BufReader::new(server.stdout.take().expect("piped"));
    let addr: SocketAddr = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("listening ")
                .and_then(|r| r.split_whitespace().nth(1)?.parse().ok())
        })
        .expect("ktern printed its address");
    let cfg = client_config();
    // Warm up: first allocations, thread-local caches, session cache.
    for _ in 0..200 {
        if let Ok(mut t) = connect(&cfg, addr) {
            let _ = t.write_all(b"x").and_then(|_| t.read_exact(&mut [0u8; 1]));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = ktern::sys::rss_of(server.id()).expect("rss");
    let mut open = Vec::with_capacity(conns);
    let start = Instant::now();
    for i in 0..conns {
        match connect(&cfg, addr).and_then(|mut t| {
            t.write_all(b"x")?;
            t.read_exact(&mut [0u8; 1])?;
            Ok(t)
        }) {
            Ok(t) => open.push(t),
            Err(e) => {
                eprintln!("connection {i} failed: {e}");
                break;
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = ktern::sys::rss_of(server.id()).expect("rss");
    let n = open.len().max(1) as f64;
    println!(
        "idle_connections={} open_seconds={:.1} rss_before_kib={} rss_after_kib={} rss_per_connection_kib={:.2}",
        open.len(),
        start.elapsed().as_secs_f64(),
        before / 1024,
        after / 1024,
        (after.saturating_sub(before)) as f64 / 1024.0 / n
    );
    drop(open);
    let _ = server.kill();
    let _ = backend.kill();
    let _ = server.wait();
    let _ = backend.wait();
}

fn main() {
    match Cli::parse().mode {
        Mode::Rss {
            ktern,
            config,
            backend,
            conns,
        } => rss(ktern, config, backend, conns),
        Mode::Handshakes {
            addr,
            threads,
            seconds,
            max,
        } => handshakes(addr, threads, seconds, max),
        Mode::Idle { addr, conns, hold } => idle(addr, conns, hold),
        Mode::Download { addr, times, bytes } => download(addr, times, bytes),
        Mode::Backend {
            listen,
            kind,
            bytes,
            seconds,
        } => backend(listen, kind, bytes, seconds),
    }
}
