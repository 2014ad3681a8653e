//! `ktern-load`: the project's load generator and benchmark backend.
//!
//! Every mode is bounded in count and time and stops by itself.
//!
//! - `handshakes`: TLS 1.3 handshakes (X25519 only; full, or resumed with
//!   `--resume`) from N threads for a fixed time; each connection sends one
//!   byte and waits for it to come back, so the server has finished its
//!   side too.
//! - `idle`: opens N TLS connections, completes each handshake, holds them
//!   all open for a while (for RSS-per-connection measurements).
//! - `download`: fetches everything a source backend sends, K times.
//! - `http`: keep-alive HTTP/1.1 GETs over N TLS connections (one thread
//!   each) for a fixed time: closed loop (as fast as possible), or open loop
//!   at a fixed total rate with latency measured from each request's
//!   scheduled send time (no coordinated omission).
//! - `halfopen`: N connections that send a ClientHello and nothing more
//!   (the server holds a handshake for each until its handshake timeout),
//!   held for a while.
//! - `slowread`: N TLS connections that each ask for `--path` and then read
//!   nothing while held (a slow-reader flood), then close.
//! - `backend`: a plain TCP backend: `echo` echoes; `source` sends N bytes
//!   to each connection and closes; `http` answers every HTTP/1.1 request
//!   head with 200 and a fixed-size body, keep-alive.

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
    /// Print each summary as one JSON object (numbers as numbers) instead
    /// of `key=value` pairs.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    mode: Mode,
}

/// Set from `--json` before any mode runs.
static JSON: AtomicBool = AtomicBool::new(false);

/// Prints a summary line of `key=value` pairs, or the same as one JSON
/// object with `--json` (a value with a unit, `123/s`, loses the unit).
fn report(line: &str) {
    if !JSON.load(Ordering::Relaxed) {
        println!("{line}");
        return;
    }
    let fields: serde_json::Map<String, serde_json::Value> = line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            let number = v.trim_end_matches("/s");
            let value = match (number.parse::<u64>(), number.parse::<f64>()) {
                (Ok(n), _) => serde_json::Value::from(n),
                (_, Ok(x)) => serde_json::Value::from(x),
                _ => serde_json::Value::from(v),
            };
            (k.to_string(), value)
        })
        .collect();
    println!("{}", serde_json::Value::Object(fields));
}

#[derive(Subcommand)]
enum Mode {
    /// The server's crypto in one full TLS 1.3 handshake, `--count` times
    /// in this thread through ktern's provider: an X25519 key share, its
    /// agreement, and an ECDSA P-256 CertificateVerify signature (the
    /// floor a full handshake's CPU is measured against, with a plain-TCP
    /// connection's; a resumed one does the key exchange only). Reports
    /// this thread's CPU time for each part, in all.
    Crypto {
        #[arg(long, default_value_t = 1000)]
        count: u64,
    },
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
        /// Resume with the server's tickets (each thread's first handshake
        /// is full); reports how many resumed.
        #[arg(long)]
        resume: bool,
        /// No TLS at all: the same connection and byte over plain TCP
        /// (the floor a TLS handshake is measured against).
        #[arg(long, conflicts_with = "resume")]
        plain: bool,
    },
    /// Open `--conns` TLS connections and hold them for `--hold` seconds.
    Idle {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        #[arg(long, default_value_t = 10)]
        hold: u64,
        /// Only the handshake: no byte through an echo backend (for an
        /// `http` route, where an idle client sends nothing).
        #[arg(long)]
        no_echo: bool,
    },
    /// `--conns` connections that send a ClientHello and stop, held `--hold` seconds.
    Halfopen {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 5000)]
        conns: usize,
        #[arg(long, default_value_t = 5)]
        hold: u64,
    },
    /// `--conns` TLS connections that request `--path` and read nothing for `--hold` seconds.
    Slowread {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 500)]
        conns: usize,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 5)]
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
    /// Keep-alive HTTP/1.1 GETs over `--conns` TLS connections for `--seconds`.
    /// Closed loop, or open loop at `--rate` requests/s in total.
    Http {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 50)]
        conns: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Total requests per second across all connections (open loop).
        #[arg(long)]
        rate: Option<f64>,
        /// Hard cap on requests, whatever the time.
        #[arg(long, default_value_t = 10_000_000)]
        max: u64,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value = "localhost")]
        host: String,
        /// Expected body length of every response (checked if given).
        #[arg(long)]
        body_bytes: Option<u64>,
        /// No TLS: the same requests over plain TCP, for the floor a
        /// proxied HTTPS request is measured against (a server's plain
        /// HTTP listener proxying to the same backend).
        #[arg(long)]
        plain: bool,
    },
    /// A plain TCP backend for the benchmarks (runs for `--seconds`).
    Backend {
        /// Address to listen on; with port 0 the kernel picks one, and the
        /// backend prints `backend ADDR` on stdout once it listens.
        #[arg(long)]
        listen: SocketAddr,
        /// `echo`, `source` (sends `--bytes` then closes), or `http`
        /// (keep-alive, 200 with a `--body-bytes` body to every request).
        #[arg(long, default_value = "echo")]
        kind: String,
        #[arg(long, default_value_t = 0)]
        bytes: u64,
        #[arg(long, default_value_t = 1024)]
        body_bytes: usize,
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

fn handshakes(addr: SocketAddr, threads: usize, seconds: u64, max: u64, resume: bool, plain: bool) {
    let done = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (done, resumed, failed, stop) =
                (done.clone(), resumed.clone(), failed.clone(), stop.clone());
            std::thread::spawn(move || {
                // A cache per thread, so each thread resumes its own
                // sessions.
                let cfg = if resume {
                    anycert::resuming_client()
                } else {
                    client_config()
                };
                let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("valid histogram");
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let t = Instant::now();
                    let ok = if plain {
                        plain_round_trip(addr)
                    } else {
                        connect(&cfg, addr).and_then(|mut tls| {
                            // One byte through the echo backend: the server has
                            // finished its half of the handshake and proxied.
                            tls.write_all(b"x")?;
                            let mut b = [0u8; 1];
                            tls.read_exact(&mut b)?;
                            if tls.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                                resumed.fetch_add(1, Ordering::Relaxed);
                            }
                            tls.conn.send_close_notify();
                            let _ = tls.flush();
                            Ok(())
                        })
                    };
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
    report(&format!(
        "handshakes={n} resumed={} failed={} seconds={secs:.2} rate={:.0}/s p50_us={} p99_us={}",
        resumed.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        n as f64 / secs,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99)
    ));
}

/// One plain-TCP connection through an echo path: one byte there and back.
fn plain_round_trip(addr: SocketAddr) -> std::io::Result<()> {
    let mut sock = TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    sock.write_all(b"x")?;
    sock.read_exact(&mut [0u8; 1])
}

fn idle(addr: SocketAddr, conns: usize, hold: u64, echo: bool) {
    let cfg = client_config();
    let mut open = Vec::with_capacity(conns);
    let start = Instant::now();
    for i in 0..conns {
        match connect(&cfg, addr) {
            Ok(mut tls) => {
                // Make the server finish the handshake and hand the keys over.
                if !echo || (tls.write_all(b"x").is_ok() && tls.read_exact(&mut [0u8; 1]).is_ok()) {
                    open.push(tls);
                }
            }
            Err(e) => {
                eprintln!("connection {i} failed: {e}");
                break;
            }
        }
    }
    report(&format!(
        "open={} seconds={:.1}",
        open.len(),
        start.elapsed().as_secs_f64()
    ));
    let _ = std::io::stdout().flush();
    std::thread::sleep(Duration::from_secs(hold));
    println!("closing");
}

/// Opens up to `conns` connections with `open` (stopping at the first
/// failure), prints `open=N`, holds them `hold` seconds, then closes all.
fn hold_open<T>(conns: usize, hold: u64, mut open: impl FnMut() -> std::io::Result<T>) {
    let mut held = Vec::with_capacity(conns);
    for i in 0..conns {
        match open() {
            Ok(c) => held.push(c),
            Err(e) => {
                eprintln!("connection {i} failed: {e}");
                break;
            }
        }
    }
    report(&format!("open={}", held.len()));
    let _ = std::io::stdout().flush();
    std::thread::sleep(Duration::from_secs(hold));
    println!("closing");
}

fn halfopen(addr: SocketAddr, conns: usize, hold: u64) {
    let cfg = client_config();
    hold_open(conns, hold, || {
        let name = ServerName::try_from("localhost").expect("valid name");
        let mut conn = ClientConnection::new(cfg.clone(), name).map_err(std::io::Error::other)?;
        let mut hello = Vec::new();
        conn.write_tls(&mut hello)?;
        let mut s = TcpStream::connect(addr)?;
        s.write_all(&hello)?;
        Ok(s)
    });
}

fn slowread(addr: SocketAddr, conns: usize, path: &str, hold: u64) {
    let cfg = client_config();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    hold_open(conns, hold, || {
        let mut tls = connect(&cfg, addr)?;
        // A small receive buffer, as a slow client on a thin link has.
        socket2::SockRef::from(&tls.sock).set_recv_buffer_size(4096)?;
        tls.write_all(request.as_bytes())?;
        tls.flush()?;
        Ok(tls)
    });
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
    report(&format!(
        "downloads={times} bytes={} seconds={secs:.2} MBps={:.1}",
        bytes * times as u64,
        (bytes * times as u64) as f64 / secs / 1e6
    ));
}

/// Shared by the `http` connection threads.
struct HttpLoad {
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
    plain: bool,
    request: Vec<u8>,
    body_bytes: Option<u64>,
    /// Time between two sends on one connection (open loop), or none.
    interval: Option<Duration>,
    seconds: u64,
    max: u64,
    done: AtomicU64,
    errors: AtomicU64,
    reconnects: AtomicU64,
    stop: AtomicBool,
    reported: AtomicBool,
}

impl HttpLoad {
    fn error(&self, what: &str, e: &std::io::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if !self.reported.swap(true, Ordering::Relaxed) {
            eprintln!("first error: {what}: {e}");
        }
    }
}

/// One `http` client connection: TLS, or plain TCP (`--plain`).
enum HttpConn {
    Tls(Box<Tls>),
    Plain(TcpStream),
}

impl HttpConn {
    fn open(load: &HttpLoad) -> std::io::Result<HttpConn> {
        let conn = if load.plain {
            let sock = TcpStream::connect(load.addr)?;
            sock.set_nodelay(true)?;
            HttpConn::Plain(sock)
        } else {
            HttpConn::Tls(Box::new(connect(&load.cfg, load.addr)?))
        };
        let sock = match &conn {
            HttpConn::Tls(t) => &t.sock,
            HttpConn::Plain(s) => s,
        };
        // Bounded: a stuck server cannot hold the run past its end for long.
        sock.set_read_timeout(Some(Duration::from_secs(5)))?;
        sock.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(conn)
    }

    /// Ends the connection: close_notify first under TLS.
    fn close(self) {
        if let HttpConn::Tls(mut t) = self {
            t.conn.send_close_notify();
            let _ = t.flush();
        }
    }
}

impl Read for HttpConn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            HttpConn::Tls(t) => t.read(buf),
            HttpConn::Plain(s) => s.read(buf),
        }
    }
}

impl Write for HttpConn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            HttpConn::Tls(t) => t.write(buf),
            HttpConn::Plain(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            HttpConn::Tls(t) => t.flush(),
            HttpConn::Plain(s) => s.flush(),
        }
    }
}

/// Reads one response from `tls` (bytes already received are in `buf`, and
/// what follows the response stays there). Checks status 200 and the body
/// length; returns whether the server asked to close the connection.
fn read_response(
    tls: &mut HttpConn,
    buf: &mut Vec<u8>,
    chunk: &mut [u8],
    body_bytes: Option<u64>,
) -> std::io::Result<bool> {
    use std::io::{Error, ErrorKind};
    let mut fill = |tls: &mut HttpConn, buf: &mut Vec<u8>| match tls.read(chunk) {
        Ok(0) => Err(Error::new(ErrorKind::UnexpectedEof, "connection closed")),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Err(e) => Err(e),
    };
    let (head_len, status, length, close) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                let mut length = None;
                let mut close = false;
                for h in resp.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        length = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse::<u64>().ok());
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        close = h.value.eq_ignore_ascii_case(b"close");
                    }
                }
                break (n, resp.code.unwrap_or(0), length, close);
            }
            Ok(httparse::Status::Partial) if buf.len() < 16 << 10 => fill(tls, buf)?,
            Ok(httparse::Status::Partial) => {
                return Err(Error::new(
                    ErrorKind::InvalidData,
                    "response head too large",
                ))
            }
            Err(e) => return Err(Error::new(ErrorKind::InvalidData, e)),
        }
    };
    if status != 200 {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("status {status}"),
        ));
    }
    let Some(length) = length else {
        return Err(Error::new(ErrorKind::InvalidData, "no Content-Length"));
    };
    if let Some(want) = body_bytes.filter(|&b| b != length) {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("body of {length} bytes, expected {want}"),
        ));
    }
    let end = head_len + length as usize;
    while buf.len() < end {
        fill(tls, buf)?;
    }
    buf.drain(..end);
    Ok(close)
}

/// One connection's loop: returns its latency histogram (microseconds).
fn http_conn(
    load: &HttpLoad,
    index: usize,
    conns: usize,
    go: &std::sync::Barrier,
) -> hdrhistogram::Histogram<u64> {
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("valid histogram");
    let open = HttpConn::open;
    // Handshakes before the clock starts.
    let mut tls = match open(load) {
        Ok(t) => Some(t),
        Err(e) => {
            load.error("connect", &e);
            None
        }
    };
    go.wait();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(load.seconds);
    // Open loop: connections staggered evenly over one interval.
    let mut next = load
        .interval
        .map(|i| start + i.mul_f64(index as f64 / conns as f64));
    let mut buf = Vec::with_capacity(16 << 10);
    let mut chunk = vec![0u8; 16 << 10];
    let mut failed_connects = 0u32;
    while !load.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let scheduled = match (next.as_mut(), load.interval) {
            (Some(next), Some(interval)) => {
                let at = *next;
                if at >= deadline {
                    break;
                }
                if at > now {
                    std::thread::sleep(at - now);
                }
                *next += interval;
                at
            }
            _ => now,
        };
        if tls.is_none() {
            match open(load) {
                Ok(t) => {
                    failed_connects = 0;
                    buf.clear();
                    load.reconnects.fetch_add(1, Ordering::Relaxed);
                    tls = Some(t);
                }
                Err(e) => {
                    load.error("connect", &e);
                    failed_connects += 1;
                    if failed_connects >= 100 {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
        }
        let conn = tls.as_mut().expect("connected above");
        let res = conn
            .write_all(&load.request)
            .and_then(|_| conn.flush())
            .and_then(|_| read_response(conn, &mut buf, &mut chunk, load.body_bytes));
        match res {
            Ok(close) => {
                let us = scheduled.elapsed().as_micros() as u64;
                let _ = hist.record(us);
                if load.done.fetch_add(1, Ordering::Relaxed) + 1 >= load.max {
                    load.stop.store(true, Ordering::Relaxed);
                }
                if close {
                    tls = None;
                }
            }
            Err(e) => {
                load.error("request", &e);
                tls = None;
            }
        }
    }
    if let Some(t) = tls {
        t.close();
    }
    hist
}

#[allow(clippy::too_many_arguments)]
fn http(
    addr: SocketAddr,
    conns: usize,
    seconds: u64,
    rate: Option<f64>,
    max: u64,
    path: String,
    host: String,
    body_bytes: Option<u64>,
    plain: bool,
) {
    let conns = conns.max(1);
    let interval = match rate {
        Some(r) if r > 0.0 => Some(Duration::from_secs_f64(conns as f64 / r)),
        Some(_) => {
            eprintln!("--rate must be positive");
            std::process::exit(2);
        }
        None => None,
    };
    let load = Arc::new(HttpLoad {
        addr,
        cfg: client_config(),
        plain,
        request: format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes(),
        body_bytes,
        interval,
        seconds,
        max,
        done: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        reported: AtomicBool::new(false),
    });
    let go = Arc::new(std::sync::Barrier::new(conns + 1));
    let workers: Vec<_> = (0..conns)
        .map(|i| {
            let (load, go) = (load.clone(), go.clone());
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || http_conn(&load, i, conns, &go))
                .expect("spawn connection thread")
        })
        .collect();
    go.wait();
    let start = Instant::now();
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("valid histogram");
    for w in workers {
        if let Ok(h) = w.join() {
            let _ = hist.add(h);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let n = load.done.load(Ordering::Relaxed);
    report(&format!(
        "requests={n} errors={} seconds={secs:.2} rps={:.0} p50_us={} p99_us={} max_us={} reconnects={}",
        load.errors.load(Ordering::Relaxed),
        n as f64 / secs,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.max(),
        load.reconnects.load(Ordering::Relaxed),
    ));
}

/// One thread, one monoio runtime (epoll driver, so it runs anywhere), one
/// task per connection: 10,000 idle connections cost little.
fn backend(listen: SocketAddr, kind: String, bytes: u64, body_bytes: usize, seconds: u64) {
    use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
    if !matches!(kind.as_str(), "echo" | "source" | "http") {
        eprintln!("unknown backend kind {kind:?} (echo, source, http)");
        std::process::exit(2);
    }
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
        if listen.port() == 0 {
            // For a caller that must not pick a free port and release it
            // before this binds it (another process may take it between).
            println!("backend {}", listener.local_addr().expect("bound address"));
        }
        let payload: std::rc::Rc<Vec<u8>> = std::rc::Rc::new(vec![0x5a; 1 << 20]);
        let mut response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {body_bytes}\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .into_bytes();
        response.resize(response.len() + body_bytes, 0x5a);
        let response = std::rc::Rc::new(response);
        while let Ok((mut conn, _)) = listener.accept().await {
            let _ = conn.set_nodelay(true);
            let source = kind == "source";
            let http = kind == "http";
            let payload = payload.clone();
            let response = response.clone();
            monoio::spawn(async move {
                if http {
                    http_backend(&mut conn, &response).await;
                } else if source {
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

/// The `http` backend's connection loop: answers every request head (up to
/// the blank line; requests carry no body here) with `response`. Pipelined
/// heads read together are answered together, in order; a head split over
/// reads waits for the rest. Ends on EOF, error, a `Connection: close`
/// request, or a head over 64 KiB.
async fn http_backend(conn: &mut monoio::net::TcpStream, response: &[u8]) {
    use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
    let mut pending: Vec<u8> = Vec::with_capacity(16 << 10);
    let mut scratch: Vec<u8> = Vec::with_capacity(16 << 10);
    let mut out: Vec<u8> = Vec::with_capacity(response.len());
    // Where the search for the next blank line resumes (no rescans).
    let mut scanned = 0;
    loop {
        let mut consumed = 0;
        let mut close = false;
        while let Some(i) = pending[scanned..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = scanned + i + 4;
            close |= wants_close(&pending[consumed..end]);
            out.extend_from_slice(response);
            consumed = end;
            scanned = end;
            if close {
                break;
            }
        }
        pending.drain(..consumed);
        // A blank line may straddle this read and the next.
        scanned = (scanned - consumed).max(pending.len().saturating_sub(3));
        if !out.is_empty() {
            let (res, b) = conn.write_all(out).await;
            if res.is_err() {
                return;
            }
            out = b;
            out.clear();
        }
        if close || pending.len() > 64 << 10 {
            return;
        }
        let (res, b) = conn.read(scratch).await;
        scratch = b;
        match res {
            Ok(0) | Err(_) => return,
            Ok(n) => pending.extend_from_slice(&scratch[..n]),
        }
    }
}

/// Whether a request head has `Connection: close` (HTTP/1.1 default is keep-alive).
fn wants_close(head: &[u8]) -> bool {
    head.split(|&b| b == b'\n').skip(1).any(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match line.iter().position(|&b| b == b':') {
            Some(c) => {
                line[..c].eq_ignore_ascii_case(b"connection")
                    && line[c + 1..]
                        .split(|&b| b == b',')
                        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
            }
            None => false,
        }
    })
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
    report(&format!(
        "idle_connections={} open_seconds={:.1} rss_before_kib={} rss_after_kib={} rss_per_connection_kib={:.2}",
        open.len(),
        start.elapsed().as_secs_f64(),
        before / 1024,
        after / 1024,
        (after.saturating_sub(before)) as f64 / 1024.0 / n
    ));
    drop(open);
    let _ = server.kill();
    let _ = backend.kill();
    let _ = server.wait();
    let _ = backend.wait();
}

/// This thread's time on a CPU so far, in ns (under qemu's `-icount
/// shift=0` a ns is one guest instruction).
fn thread_cpu_ns() -> u64 {
    ktern::sys::thread_cpu_time().as_nanos() as u64
}

fn crypto(count: u64) {
    let provider = ktern::handshake::crypto_provider();
    let x25519 = provider
        .kx_groups
        .iter()
        .find(|g| g.name() == rustls::NamedGroup::X25519)
        .expect("the provider has X25519");
    let peer = x25519.start().unwrap().pub_key().to_vec();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signing = provider.key_provider.load_private_key(der).unwrap();
    let signer = signing
        .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
        .expect("a P-256 signer");
    // What a TLS 1.3 server signs (RFC 8446 §4.4.3): 64 spaces, the
    // context string, a zero byte and the SHA-256 transcript hash.
    let message = [0x20u8; 64 + 33 + 1 + 32];
    let cpu0 = thread_cpu_ns();
    for _ in 0..count {
        let share = x25519.start().unwrap();
        std::hint::black_box(share.pub_key());
        let secret = share.complete(&peer).unwrap();
        std::hint::black_box(secret.secret_bytes());
    }
    let cpu1 = thread_cpu_ns();
    for _ in 0..count {
        std::hint::black_box(signer.sign(&message).unwrap());
    }
    let cpu2 = thread_cpu_ns();
    let per = |ns: u64| ns / count.max(1);
    report(&format!(
        "handshakes={count} kx_ns={} sign_ns={} kx_ns_each={} sign_ns_each={}",
        cpu1 - cpu0,
        cpu2 - cpu1,
        per(cpu1 - cpu0),
        per(cpu2 - cpu1)
    ));
}

fn main() {
    let cli = Cli::parse();
    JSON.store(cli.json, Ordering::Relaxed);
    match cli.mode {
        Mode::Crypto { count } => crypto(count),
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
            resume,
            plain,
        } => handshakes(addr, threads, seconds, max, resume, plain),
        Mode::Idle {
            addr,
            conns,
            hold,
            no_echo,
        } => idle(addr, conns, hold, !no_echo),
        Mode::Halfopen { addr, conns, hold } => halfopen(addr, conns, hold),
        Mode::Slowread {
            addr,
            conns,
            path,
            hold,
        } => slowread(addr, conns, &path, hold),
        Mode::Download { addr, times, bytes } => download(addr, times, bytes),
        Mode::Http {
            addr,
            conns,
            seconds,
            rate,
            max,
            path,
            host,
            body_bytes,
            plain,
        } => http(
            addr, conns, seconds, rate, max, path, host, body_bytes, plain,
        ),
        Mode::Backend {
            listen,
            kind,
            bytes,
            body_bytes,
            seconds,
        } => backend(listen, kind, bytes, body_bytes, seconds),
    }
}
