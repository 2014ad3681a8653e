//! The admin endpoint: plain HTTP/1.1 on its own thread (loopback unless
//! configured otherwise), never on a shard. A scrape reads the shards'
//! atomics and takes no lock a shard holds; a reload runs on the admin
//! connection's own thread, so scrapes keep answering while it builds.
//!
//! - `GET /metrics`: Prometheus text format, every shard summed.
//! - `GET /healthz`: 200 while the process runs.
//! - `GET /ready`: 200 when every shard listens; 503 while starting or
//!   draining (load balancers withdraw the host on it).
//! - `GET /certs`: the current generation's certificates as JSON.
//! - `POST /reload`: re-read the config; 200 with the new generation, or
//!   422/409/500 with every reason, as JSON.
//!
//! A request a web page's script (or form) made is refused with 403
//! ([`from_a_web_page`]): a page in a browser on the host, or one that
//! rebinds its own DNS name to this address, must not reload ktern, nor
//! (in browsers that send Fetch Metadata) read its backends and names.
//! Prometheus, curl and an operator typing the URL into a browser are
//! served.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{Control, ReloadError};

/// Admin connections served at once; more get a 503 at accept.
const MAX_CONNECTIONS: usize = 32;
/// Largest request head read.
const MAX_HEAD: usize = 8 << 10;

/// Serves `listener` (bound here, or handed over by the binary this one
/// upgrades) on a `ktern-admin` thread, until a binary upgrade hands it on.
/// `configured` is `admin.address` as written (port 0 stays 0), which a
/// binary upgrade matches.
pub fn serve(
    configured: SocketAddr,
    listener: TcpListener,
    control: Arc<Control>,
) -> std::io::Result<SocketAddr> {
    let bound = listener.local_addr()?;
    // Non-blocking with a poll timeout, so the thread notices the stop flag
    // (after an upgrade the socket stays open in the new process: closing
    // our copy would not wake a blocked accept).
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    control.set_admin(configured, listener.try_clone()?, stop.clone());
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("ktern-admin".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match crate::sys::wait_readable(listener.as_fd(), 200) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin: poll failed");
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                }
                // Handed over while we waited: the new process answers.
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let conn = match listener.accept() {
                    Ok((conn, _)) => conn,
                    // Another process sharing the socket (upgrade) took it.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin: accept failed");
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                };
                if busy.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
                    busy.fetch_sub(1, Ordering::Relaxed);
                    // Said, not just closed: a scraper or `ktern reload`
                    // learns why. One write into an empty socket buffer,
                    // still non-blocking: this thread never waits on it.
                    let _ = (&conn).write(BUSY);
                    continue;
                }
                let slot = Slot(busy.clone());
                if conn.set_nonblocking(false).is_err() {
                    continue;
                }
                let control = control.clone();
                let spawned = std::thread::Builder::new()
                    .name("ktern-admin-conn".into())
                    .spawn(move || {
                        // Given back however `handle` ends, a panic too.
                        let _slot = slot;
                        handle(conn, &control);
                    });
                drop(spawned);
            }
            tracing::info!("admin endpoint handed over");
        })?;
    Ok(bound)
}

/// A response: status, content type, body.
struct Answer(u16, &'static str, String);

/// The answer when every admin slot is taken.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 32\r\nconnection: close\r\n\r\nbusy: every admin slot is taken\n";

/// One of the `MAX_CONNECTIONS` admin slots, given back when dropped (by
/// the connection's thread, or here when that thread cannot start).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long one admin connection may take to receive its answer: a
/// reader that takes a byte now and then (a `/metrics` body is tens of KB)
/// cannot hold a slot for good.
const WRITE_WITHIN: Duration = Duration::from_secs(10);

/// Writes `bytes` by `until`; gives up then.
fn write_within(conn: &mut TcpStream, bytes: &[u8], until: std::time::Instant) -> bool {
    let mut rest = bytes;
    while !rest.is_empty() {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || conn.set_write_timeout(Some(left)).is_err() {
            return false;
        }
        match conn.write(rest) {
            Ok(0) => return false,
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

fn handle(mut conn: TcpStream, control: &Control) {
    // One deadline for the whole request head: a client dripping a byte at
    // a time cannot hold one of the few admin slots for long.
    let until = std::time::Instant::now() + Duration::from_secs(2);
    let mut buf = Vec::with_capacity(1024);
    let answer = loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            return;
        }
        let mut chunk = [0u8; 1024];
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) if from_a_web_page(req.headers) => {
                tracing::warn!("admin: request from a web page refused");
                break text(403, "refused: requests from web pages are not served\n");
            }
            Ok(httparse::Status::Complete(_)) => {
                break route(req.method.unwrap_or(""), req.path.unwrap_or(""), control)
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => break text(431, "request head too large\n"),
            Err(e) => break text(400, &format!("bad request: {e}\n")),
        }
    };
    let Answer(status, kind, body) = answer;
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    let until = std::time::Instant::now() + WRITE_WITHIN;
    let _ = write_within(&mut conn, head.as_bytes(), until)
        && write_within(&mut conn, body.as_bytes(), until);
}

/// Whether a browser sent this request for a page's script or form rather
/// than for its user. Browsers say so in `Sec-Fetch-Site` (Fetch Metadata:
/// `none` for a URL the user typed or bookmarked; Chrome 76, Firefox 90,
/// Safari 16.4), and send `Origin` with every cross-origin request and
/// every POST from a page, older ones too. A DNS-rebinding page reaches
/// the endpoint as its own origin, which a Host check would have to
/// guess at (Prometheus scrapes by any name): its POST carries `Origin`,
/// its GET only `Sec-Fetch-Site` (so a browser older than those versions
/// can still be made to read `/metrics`, never to reload). No client
/// other than a browser sends either.
fn from_a_web_page(headers: &[httparse::Header<'_>]) -> bool {
    headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("origin")
            || (h.name.eq_ignore_ascii_case("sec-fetch-site") && h.value != b"none")
    })
}

fn route(method: &str, target: &str, control: &Control) -> Answer {
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => Answer(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics(control),
        ),
        ("GET", "/certs") => certs(control),
        ("GET", "/healthz") => text(200, "ok\n"),
        ("GET", "/ready") => {
            if control.status.draining.load(Ordering::Relaxed) {
                text(503, "draining\n")
            } else if !control.status.ready.load(Ordering::Relaxed) {
                text(503, "starting\n")
            } else {
                text(200, "ready\n")
            }
        }
        ("POST", "/reload") => reload(control),
        (_, "/metrics" | "/healthz" | "/ready" | "/reload") => text(405, "method not allowed\n"),
        _ => text(
            404,
            "not found: try /metrics, /healthz, /ready, POST /reload\n",
        ),
    }
}

/// Every shard's counters summed, the kernel's kTLS counters, the
/// current certificates' expiry and the build.
fn metrics(control: &Control) -> String {
    let mut out = String::with_capacity(16 << 10);
    control.refresh_gauges();
    crate::metrics::render_into(&mut out, &control.metric_sets());
    // Absent without kTLS (or before Linux 5.6): nothing to mirror.
    if let Ok(stat) = std::fs::read_to_string("/proc/net/tls_stat") {
        crate::metrics::render_kernel_tls(&mut out, &stat);
    }
    let gen = control.current();
    crate::metrics::render_cert_expiry(&mut out, &gen.config);
    let capped = gen.config.upstreams.iter().zip(&gen.in_use);
    let rows = capped.flat_map(|(u, counts)| {
        let counts = counts.as_deref();
        u.backends.iter().enumerate().filter_map(move |(i, b)| {
            let counts = counts.filter(|_| b.max_conns > 0)?;
            Some((u.name.as_str(), b.addr, counts.get(i), b.max_conns))
        })
    });
    crate::metrics::render_backend_in_use(&mut out, rows);
    crate::metrics::render_build_info(&mut out);
    out
}

/// The certificates the current generation serves.
fn certs(control: &Control) -> Answer {
    let gen = control.current();
    let mut list = Vec::new();
    for l in &gen.config.listeners {
        for (i, c) in l.certificates.iter().enumerate() {
            let names = if c.server_names.is_empty() {
                &c.info.names
            } else {
                &c.server_names
            };
            list.push(serde_json::json!({
                "listener": l.name,
                "default": i == 0,
                "names": names,
                "subject": c.info.subject,
                "issuer": c.info.issuer,
                "not_after": httpdate::fmt_http_date(
                    std::time::UNIX_EPOCH + Duration::from_secs(c.info.not_after.max(0) as u64)
                ),
                "not_after_unix": c.info.not_after,
                "key_type": c.info.key_type,
                "sha256": c.info.sha256,
                "cert_file": c.info.cert_file,
                "key_file": c.info.key_file,
                "generation": gen.number,
            }));
        }
    }
    json(200, serde_json::Value::Array(list))
}

fn reload(control: &Control) -> Answer {
    match control.reload() {
        Ok(r) => {
            let listeners: Vec<_> = r
                .listeners
                .iter()
                .map(|(name, addr)| serde_json::json!({"name": name, "address": addr.to_string()}))
                .collect();
            json(
                200,
                serde_json::json!({"status": "live", "generation": r.generation, "listeners": listeners}),
            )
        }
        Err(e) => {
            let generation = control.current().number;
            let (status, errors) = match &e {
                ReloadError::Config(c) => (
                    422,
                    c.problems
                        .iter()
                        .map(|p| serde_json::json!({"file": c.file, "field": p.field, "reason": p.reason}))
                        .collect(),
                ),
                ReloadError::NoFile | ReloadError::Draining => {
                    (409, vec![serde_json::json!({"reason": e.to_string()})])
                }
                _ => (500, vec![serde_json::json!({"reason": e.to_string()})]),
            };
            json(
                status,
                serde_json::json!({"status": "refused", "generation": generation, "errors": errors}),
            )
        }
    }
}

fn text(status: u16, body: &str) -> Answer {
    Answer(status, "text/plain; charset=utf-8", body.to_string())
}

fn json(status: u16, value: serde_json::Value) -> Answer {
    Answer(status, "application/json", value.to_string() + "\n")
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::from_a_web_page;

    fn page(fields: &[(&'static str, &'static [u8])]) -> bool {
        let headers: Vec<httparse::Header<'_>> = fields
            .iter()
            .map(|&(name, value)| httparse::Header { name, value })
            .collect();
        from_a_web_page(&headers)
    }

    #[test]
    fn only_requests_a_web_page_made_are_refused() {
        // curl, Prometheus: neither field.
        assert!(!page(&[("Host", b"lb7.internal:9090"), ("Accept", b"*/*")]));
        // The operator typed the URL into a browser.
        assert!(!page(&[
            ("Sec-Fetch-Site", b"none"),
            ("Sec-Fetch-Mode", b"navigate")
        ]));
        // A page's script, cross-site or rebound to this address.
        assert!(page(&[("sec-fetch-site", b"cross-site")]));
        assert!(page(&[("Sec-Fetch-Site", b"same-origin")]));
        // A form's POST, from a browser without Fetch Metadata.
        assert!(page(&[("Origin", b"http://evil.example")]));
        assert!(page(&[("origin", b"null")]));
    }
}
