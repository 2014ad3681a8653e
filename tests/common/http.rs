//! HTTP test support shared by the suites: a scriptable HTTP/1.1 backend,
//! a config builder for `http` routes, and a response reader.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{pattern, sha256, tls_server_config, Client, Ktern, Pki};

/// A test backend named `name`; counts accepted connections.
pub struct Backend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    /// What `/healthz` answers: 200 while true, 503 while false.
    pub healthy: Arc<AtomicBool>,
    /// `/ws` tunnels whose connection ended (the peer's close or reset).
    pub ws_ended: Arc<AtomicUsize>,
}

pub fn read_chunked(r: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    read_chunked_trailers(r).map(|(body, _)| body)
}

/// A chunked body and its trailer section's lines, as received.
pub fn read_chunked_trailers(r: &mut impl BufRead) -> std::io::Result<(Vec<u8>, String)> {
    let mut trailers = String::new();
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let size = usize::from_str_radix(line.trim_end().split(';').next().unwrap_or(""), 16)
            .map_err(|_| std::io::Error::other("bad chunk size"))?;
        if size == 0 {
            // Trailers until the blank line.
            loop {
                line.clear();
                r.read_line(&mut line)?;
                if line == "\r\n" || line.is_empty() {
                    return Ok((body, trailers));
                }
                trailers.push_str(&line);
            }
        }
        let mut chunk = vec![0; size + 2];
        r.read_exact(&mut chunk)?;
        body.extend_from_slice(&chunk[..size]);
    }
}

pub fn start_http_backend(name: &'static str) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let healthy = Arc::new(AtomicBool::new(true));
    let ws_ended = Arc::new(AtomicUsize::new(0));
    let (count, health, ended) = (accepted.clone(), healthy.clone(), ws_ended.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            let (health, ended) = (health.clone(), ended.clone());
            std::thread::spawn(move || {
                let _ = http_backend_conn(name, conn, &health, &ended);
            });
        }
    });
    Backend {
        addr,
        accepted,
        healthy,
        ws_ended,
    }
}

pub fn http_backend_conn(
    name: &str,
    conn: TcpStream,
    healthy: &AtomicBool,
    ws_ended: &AtomicUsize,
) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Ok(());
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let lower = head.to_ascii_lowercase();
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        // `/trickle` and `/trickle/N`: a 200 with `half ` at once, then N
        // more bytes (5: `done\n`, else dots) one every 600 ms, each gap
        // within the tests' 1 s `response_timeout`; any request body is
        // left unread (an early answer to an upload), the connection held.
        if let Some(n) = path.strip_prefix("/trickle") {
            let rest = match n.strip_prefix('/').map(str::parse::<usize>) {
                Some(Ok(n)) => vec![b'.'; n],
                _ => b"done\n".to_vec(),
            };
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\nhalf ",
                5 + rest.len()
            )?;
            for b in rest {
                std::thread::sleep(Duration::from_millis(600));
                out.write_all(&[b])?;
            }
            std::thread::sleep(Duration::from_secs(2));
            return Ok(());
        }
        // `/early/close` and `/early/hold`: a 413 before any of the body is
        // read, as servers answer an upload they refuse; then a close (a
        // reset, with the body unread), or the connection held unread,
        // the answer not saying `Connection: close` (so only ktern's own
        // rule keeps it out of the pool). The close shuts the write side
        // first and waits a moment, as a server's lingering close does: a
        // reset sent at once can discard the answer before it leaves (seen
        // in CI: ktern read only the reset, and answered 502).
        if let Some(how) = path.strip_prefix("/early/") {
            let close = if how == "hold" {
                ""
            } else {
                "Connection: close\r\n"
            };
            write!(
                out,
                "HTTP/1.1 413 Content Too Large\r\nContent-Length: 10\r\n{close}\r\ntoo large\n"
            )?;
            if how == "hold" {
                std::thread::sleep(Duration::from_secs(5));
            } else {
                out.shutdown(std::net::Shutdown::Write)?;
                std::thread::sleep(Duration::from_millis(200));
            }
            return Ok(());
        }
        // `/deaf`: neither reads the body nor answers, for 10 s (a backend
        // that stopped reading mid-upload).
        if path == "/deaf" {
            std::thread::sleep(Duration::from_secs(10));
            return Ok(());
        }
        let mut trailers = String::new();
        let body = if lower.contains("transfer-encoding: chunked") {
            let (body, t) = read_chunked_trailers(&mut r)?;
            trailers = t;
            body
        } else if let Some(i) = lower.find("content-length: ") {
            let n: usize = lower[i + 16..]
                .lines()
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            let mut b = vec![0; n];
            r.read_exact(&mut b)?;
            b
        } else {
            Vec::new()
        };
        // Head and body in one write: two would meet Nagle and the
        // client's delayed ACK (40 ms per response on loopback).
        let reply = |out: &mut TcpStream, body: &[u8]| -> std::io::Result<()> {
            let mut answer = format!(
                "HTTP/1.1 200 OK\r\nX-Backend: {name}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            answer.extend_from_slice(body);
            out.write_all(&answer)
        };
        match path.as_str() {
            "/healthz" if !healthy.load(Ordering::SeqCst) => {
                out.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")?
            }
            "/head" => reply(&mut out, head.as_bytes())?,
            "/head-403" => {
                // The head received, refused (as a WebSocket endpoint
                // refusing an upgrade would).
                let mut answer = format!("HTTP/1.1 403 Forbidden\r\nContent-Length: {}\r\n\r\n", head.len()).into_bytes();
                answer.extend_from_slice(head.as_bytes());
                out.write_all(&answer)?;
            }
            "/sum" => reply(&mut out, format!("{} {}", body.len(), sha256(&body)).as_bytes())?,
            // The request's chunked trailer section, as received.
            "/trailers" => reply(&mut out, trailers.as_bytes())?,
            "/chunked" => out.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n")?,
            // Trailers that frame or describe the message: not for clients.
            "/framing-trailers" => out.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nContent-Length: 99\r\nX-Trailer: yes\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")?,
            "/close" => {
                out.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil close")?;
                return Ok(());
            }
            "/gzip-close" => {
                out.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nGZDATA")?;
                return Ok(());
            }
            "/close-big" => {
                out.write_all(b"HTTP/1.1 200 OK\r\n\r\n")?;
                for part in pattern(300_000, 3).chunks(70_000) {
                    out.write_all(part)?;
                    std::thread::sleep(Duration::from_millis(5));
                }
                return Ok(());
            }
            p if p.starts_with("/bytes/") => {
                // /bytes/N: N bytes of `pattern(N, N)` with a Content-Length.
                let n = p["/bytes/".len()..].parse().unwrap_or(0);
                reply(&mut out, &pattern(n, n as u64))?;
            }
            p if p.starts_with("/chunked-bytes/") => {
                // /chunked-bytes/N: the same bytes, chunked (16 KiB chunks).
                let n = p["/chunked-bytes/".len()..].parse().unwrap_or(0);
                out.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")?;
                for part in pattern(n, n as u64).chunks(16 << 10) {
                    write!(out, "{:x}\r\n", part.len())?;
                    out.write_all(part)?;
                    out.write_all(b"\r\n")?;
                }
                out.write_all(b"0\r\n\r\n")?;
            }
            p if p.starts_with("/pause-bytes/") => {
                // /pause-bytes/N?until=PATH: N bytes as /bytes/N, of which
                // the first 100,000 go at once; then `PATH.paused` is
                // created, and the rest waits until PATH exists (10 s at
                // most).
                let (n, gate) = p["/pause-bytes/".len()..]
                    .split_once("?until=")
                    .unwrap_or_default();
                let n: usize = n.parse().unwrap_or(0);
                let body = pattern(n, n as u64);
                let (first, rest) = body.split_at(100_000.min(n));
                write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n")?;
                out.write_all(first)?;
                std::fs::write(format!("{gate}.paused"), b"")?;
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while !std::path::Path::new(gate).exists() && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                out.write_all(rest)?;
            }
            p if p.starts_with("/wait-bytes/") => {
                // /wait-bytes/MS/N: N bytes of `w` after MS milliseconds
                // (cheap to make: in the VM a pattern of some MiB took
                // longer than the tests' response timeout).
                let (ms, n) = p["/wait-bytes/".len()..].split_once('/').unwrap_or_default();
                std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
                reply(&mut out, &vec![b'w'; n.parse().unwrap_or(0)])?;
            }
            p if p.starts_with("/wait/") => {
                // /wait/MS: answers after MS milliseconds.
                let ms = p["/wait/".len()..].parse().unwrap_or(0);
                std::thread::sleep(Duration::from_millis(ms));
                reply(&mut out, name.as_bytes())?;
            }
            "/slow" => {
                std::thread::sleep(Duration::from_secs(3));
                reply(&mut out, b"late")?;
            }
            p if p.starts_with("/sleep/") => {
                // `/sleep/N`: answers after N ms.
                let ms = p["/sleep/".len()..].parse().unwrap_or(0);
                std::thread::sleep(Duration::from_millis(ms));
                reply(&mut out, b"late")?;
            }
            "/bad" => {
                out.write_all(b"SSH-2.0-nope\r\n\r\n")?;
                return Ok(());
            }
            "/ws" | "/ws-wrong-accept" | "/ws-deaf" | "/ws-reset" => {
                // The accept for the request's key (RFC 6455 §4.2.2), when
                // it has one; `/ws-wrong-accept` answers another key's.
                let field = |name: &str| {
                    let at = lower.find(&format!("\r\n{name}: "))? + name.len() + 4;
                    Some(head[at..].lines().next()?.trim().to_string())
                };
                let mut switch =
                    String::from("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n");
                if let Some(key) = field("sec-websocket-key") {
                    let key = if path == "/ws-wrong-accept" { format!("{key}x") } else { key };
                    let accept = ktern::proxy::http::exchange::websocket_accept(&key);
                    switch.push_str(&format!("Sec-WebSocket-Accept: {accept}\r\n"));
                }
                if let Some(p) = field("sec-websocket-protocol") {
                    let first = p.split(',').next().unwrap_or("").trim().to_string();
                    switch.push_str(&format!("Sec-WebSocket-Protocol: {first}\r\n"));
                }
                switch.push_str("\r\nhi");
                out.write_all(switch.as_bytes())?;
                if path == "/ws-reset" {
                    // Takes the client's first byte, then resets the
                    // connection mid-tunnel (SO_LINGER 0: RST, not FIN).
                    let mut first = [0u8; 1];
                    r.read_exact(&mut first)?;
                    socket2::SockRef::from(&out).set_linger(Some(Duration::ZERO))?;
                    return Ok(());
                }
                if path == "/ws-deaf" {
                    // Reads nothing for 10 s (a client's upload fills the
                    // sockets' buffers behind it), then drains to the end.
                    std::thread::sleep(Duration::from_secs(10));
                    let drained = std::io::copy(&mut r, &mut std::io::sink());
                    ws_ended.fetch_add(1, Ordering::SeqCst);
                    return drained.map(drop);
                }
                // Echo the new protocol's bytes until the client
                // half-closes, then say "bye" (the tunnel carries the
                // backend's direction on after the client's ended).
                let mut buf = [0u8; 4096];
                let echo = (|| loop {
                    let n = r.read(&mut buf)?;
                    if n == 0 {
                        return out.write_all(b"bye");
                    }
                    out.write_all(&buf[..n])?;
                })();
                ws_ended.fetch_add(1, Ordering::SeqCst);
                return echo;
            }
            "/cut" => {
                out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")?;
                return Ok(());
            }
            p if p == "/huge" || p.starts_with("/huge/") => {
                // More than the loopback socket buffers hold on both hops:
                // 64 MiB of `h`, or /huge/N: N MiB, sent as it is made.
                let mib: usize = p.strip_prefix("/huge/").map_or(64, |n| n.parse().unwrap_or(64));
                let chunk = vec![b'h'; 1 << 20];
                write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", mib << 20)?;
                for _ in 0..mib {
                    out.write_all(&chunk)?;
                }
            }
            "/many-interim" => {
                // 20 000 interim responses in a few writes, then the answer.
                out.write_all(&b"HTTP/1.1 100 Continue\r\n\r\n".repeat(20_000))?;
                reply(&mut out, b"after the interims")?;
            }
            "/hint-close" => {
                out.write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")?;
                return Ok(());
            }
            "/stall" => {
                out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")?;
                std::thread::sleep(Duration::from_secs(4));
                return Ok(());
            }
            _ => reply(&mut out, name.as_bytes())?,
        }
        if lower.contains("connection: close") {
            return Ok(());
        }
    }
}

/// One rule sending every request to upstream `a`.
/// ktern with `runtime.ktls_after = "64k"` and a JSON access log, its
/// `http` route serving `/files/` from a static root that holds
/// `files/f.bin` (`file`: 200,000 bytes) and sending the rest to backend
/// "a": the set-up of the tests of the hand-over at a connection's first
/// bulk response (tests/http.rs over HTTP/1.1, tests/h2.rs over HTTP/2).
pub struct BulkHandover {
    pub pki: Pki,
    pub k: Ktern,
    pub file: Vec<u8>,
    pub log: std::path::PathBuf,
    pub backend: Backend,
}

/// A static directory under `pki.dir` holding `files/NAME` = `body`,
/// and a JSON access log beside it: the rules (`/files/` from the
/// directory, then `ANY_TO_A`), the `[access_log]` section for the
/// runtime part of the config, and the log's path.
pub fn files_and_json_log(
    pki: &Pki,
    name: &str,
    body: &[u8],
) -> (String, String, std::path::PathBuf) {
    let www = pki.dir.join("www");
    std::fs::create_dir_all(www.join("files")).unwrap();
    std::fs::write(www.join("files").join(name), body).unwrap();
    let log = pki.dir.join("access.log");
    let access = format!(
        "\n[access_log]\npath = \"{}\"\nformat = \"json\"\n",
        log.display()
    );
    let rules = format!(
        "[[listener.route.rule]]\npath = \"/files/\"\nstatic = \"{}\"\n{ANY_TO_A}",
        www.display()
    );
    (rules, access, log)
}

pub fn bulk_handover(tag: &str) -> BulkHandover {
    let pki = Pki::new(tag);
    let backend = start_http_backend("a");
    let file = pattern(200_000, 7);
    let (rules, access, log) = files_and_json_log(&pki, "f.bin", &file);
    let runtime = format!("ktls_after = \"64k\"\n{access}");
    let k = Ktern::start(
        &pki,
        &runtime,
        &http_config(&[("a", backend.addr)], &rules, ""),
    );
    BulkHandover {
        pki,
        k,
        file,
        log,
        backend,
    }
}

pub const ANY_TO_A: &str = "[[listener.route.rule]]\nupstream = \"a\"\n";

pub fn http_config(backends: &[(&str, SocketAddr)], rules: &str, extra: &str) -> String {
    let mut s = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[[listener.certificate]]\ncert = \"@CERT@\"\nkey = \"@KEY@\"\n[listener.route]\nkind = \"http\"\n{extra}\n{rules}\n"
    );
    for (name, addr) in backends {
        s.push_str(&format!(
            "[upstream.{name}]\nbackends = [\"{addr}\"]\nresponse_timeout = \"1s\"\n"
        ));
    }
    s
}

/// One parsed response: status, headers (lower-case names), body.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// A chunked body's trailer section's lines, as received.
    pub trailers: String,
    /// The head's bytes on the wire: status line, fields, blank line.
    pub head_len: usize,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response from a buffered TLS stream (Content-Length, chunked,
/// or until close).
pub fn read_response(r: &mut BufReader<&mut Client>, head_request: bool) -> std::io::Result<Resp> {
    let mut status_line = String::new();
    let mut head_len = r.read_line(&mut status_line)?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line: {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        head_len += r.read_line(&mut line)?;
        if line == "\r\n" {
            break;
        }
        let (n, v) = line
            .split_once(':')
            .ok_or_else(|| std::io::Error::other(format!("bad header line {line:?}")))?;
        headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
    }
    let mut resp = Resp {
        status,
        headers,
        body: Vec::new(),
        trailers: String::new(),
        head_len,
    };
    if head_request || status == 100 || status == 204 || status == 304 {
        return Ok(resp);
    }
    if resp.header("transfer-encoding") == Some("chunked") {
        (resp.body, resp.trailers) = read_chunked_trailers(r)?;
    } else if let Some(n) = resp.header("content-length") {
        let mut b = vec![0; n.parse().unwrap()];
        r.read_exact(&mut b)?;
        resp.body = b;
    } else {
        r.read_to_end(&mut resp.body)?;
    }
    Ok(resp)
}

pub fn exchange(c: &mut Client, request: &str) -> Resp {
    try_exchange(c, request).unwrap()
}

/// POSTs `body` to the backend's `/sum` on `c` and checks its answer (the
/// length and SHA-256 of what arrived).
pub fn upload_checked(c: &mut Client, host: &str, body: &[u8]) {
    let mut req = format!(
        "POST /sum HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    c.write_all(&req).unwrap();
    let r = read_response(&mut BufReader::new(c), false).unwrap();
    assert_eq!(
        String::from_utf8(r.body).unwrap(),
        format!("{} {}", body.len(), sha256(body)),
        "upload of {} bytes",
        body.len()
    );
}

/// The JSON access log at `path` once it has `n` lines (waits up to 5 s;
/// the lines are written after each response), one object per line.
/// An `[access_log]` section writing JSON lines to `access.log` in `dir`:
/// the file's path and the section, to add to a config's runtime part.
pub fn json_access_log(dir: &std::path::Path) -> (std::path::PathBuf, String) {
    let log = dir.join("access.log");
    let section = format!(
        "\n[access_log]\npath = \"{}\"\nformat = \"json\"\n",
        log.display()
    );
    (log, section)
}

pub fn json_log_lines(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
            .collect();
        if lines.len() >= n {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    lines
}

/// One request and its response; errors instead of panicking (load tests
/// count them).
pub fn try_exchange(c: &mut Client, request: &str) -> std::io::Result<Resp> {
    c.write_all(request.as_bytes())?;
    c.flush()?;
    let mut r = BufReader::new(c);
    let resp = read_response(&mut r, request.starts_with("HEAD "))?;
    // Bytes already read past the response would be lost with the reader:
    // they can only be a body the framing did not announce.
    if !r.buffer().is_empty() {
        return Err(std::io::Error::other(format!(
            "bytes after the response: {:?}",
            String::from_utf8_lossy(r.buffer())
        )));
    }
    Ok(resp)
}

/// A TLS backend (rustls, `pki`'s certificate) for tests of one response
/// at a time: each connection reads one request head (no body) and hands
/// it, with the stream, to `answer`, which writes what it likes and ends
/// the connection as it likes. Returns its address and how many
/// connections it accepted.
pub fn tls_backend_answering(
    pki: &Pki,
    answer: impl Fn(&mut rustls::StreamOwned<rustls::ServerConnection, std::net::TcpStream>, &[u8])
        + Send
        + Sync
        + 'static,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::Read;
    let cfg = tls_server_config(pki, None);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let answer = std::sync::Arc::new(answer);
    std::thread::spawn(move || {
        for sock in listener.incoming().flatten() {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (cfg, answer) = (cfg.clone(), answer.clone());
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(cfg).unwrap();
                let mut s = rustls::StreamOwned::new(conn, sock);
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if !matches!(s.read(&mut byte), Ok(1)) {
                        return;
                    }
                    head.push(byte[0]);
                }
                answer(&mut s, &head);
            });
        }
    });
    (addr, accepted)
}
