//! The access log: one line per HTTP request, in nginx's `combined` layout
//! extended with the TLS facts (SNI, version, cipher, kTLS), or as JSON.
//!
//! Every field that came from the client is escaped: a hostile path or
//! header cannot forge a second line or break the JSON.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::handshake::TlsInfo;

/// One finished request.
pub struct Record<'a> {
    /// When the request head arrived.
    pub time: SystemTime,
    /// The client address.
    pub client: SocketAddr,
    /// SNI, TLS version and cipher of the connection.
    pub tls: &'a TlsInfo,
    /// The kernel carried the connection's records when this request
    /// ended (a connection rustls carried at first moves at its first bulk
    /// response, `runtime.ktls_after`).
    pub kernel: bool,
    /// Request method.
    pub method: &'a str,
    /// Host header (as sent, port kept), or empty.
    pub host: &'a str,
    /// Request target as sent.
    pub target: &'a str,
    /// The request's protocol as logged: `HTTP/1.0`, `HTTP/1.1` or
    /// `HTTP/2.0` (nginx's `$server_protocol`).
    pub protocol: &'a str,
    /// Status sent to the client.
    pub status: u16,
    /// Bytes read from the client for this request (head and body).
    pub bytes_in: u64,
    /// Bytes sent to the client for this request (head and body).
    pub bytes_out: u64,
    /// `Referer` and `User-Agent`, if sent.
    pub referer: Option<&'a [u8]>,
    /// See `referer`.
    pub user_agent: Option<&'a [u8]>,
    /// The backend that answered, if one did.
    pub upstream: Option<SocketAddr>,
    /// Time from the request head to the end of the response.
    pub total: Duration,
    /// Time from the request head to the backend's response head.
    pub upstream_time: Option<Duration>,
}

pub use crate::config::AccessFormat as Format;

/// Where access lines go. Cheap to clone (one `Arc`).
///
/// Shards never write the log themselves: a full pipe on stdout (a stalled
/// journald, a paused `| less`) or a slow disk would stop every request of
/// every shard. Lines go into a bounded queue in memory that one writer
/// thread empties, gathering them into few `write` calls; what does not fit
/// is dropped and counted (`ktern_access_log_dropped_total`), as HAProxy
/// drops log lines rather than wait.
#[derive(Debug, Clone)]
pub struct Sink {
    queue: Arc<Handle>,
    format: Format,
}

/// The queue's last handle: dropping it (the generation that opened the log
/// is gone) lets the writer finish what is queued, close the file and end.
#[derive(Debug)]
struct Handle(Arc<Queue>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.wake.notify_one();
    }
}

#[derive(Debug)]
struct Queue {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// `access_log.queue`.
    limit: usize,
}

#[derive(Debug, Default)]
struct Pending {
    /// Whole lines, each ending in `\n`.
    bytes: Vec<u8>,
    /// How many lines `bytes` holds (a failed write says how many it lost).
    lines: u64,
    /// Lines dropped since the writer last caught up (logged then).
    dropped: u64,
    /// Set by the last `Sink`'s drop.
    closed: bool,
}

impl Queue {
    /// A shard that panicked holding the lock left whole lines behind (the
    /// queue only ever grows by a whole line): the data is still good.
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
enum Target {
    Stdout,
    File(std::fs::File),
}

/// The writer waits this long after the first line of a batch for more, so
/// that a busy log costs one `write` per batch, not one per request: about
/// what a line can lag behind its request.
const GATHER: Duration = Duration::from_millis(20);
/// ...unless this much is queued (or half the queue, if smaller).
const BATCH: usize = 64 << 10;
/// A writer's spare buffer is kept up to this size between bursts.
const KEEP: usize = 256 << 10;

/// Bytes queued or being written, over every open log (this generation's
/// and any a reload replaced): what `flush` waits for.
static UNWRITTEN: AtomicUsize = AtomicUsize::new(0);

/// Why a log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The file (a config problem: permissions, a read-only filesystem).
    #[error("{0}")]
    File(#[source] std::io::Error),
    /// The writer thread (internal).
    #[error("cannot start the access log's writer thread: {0}")]
    Thread(#[source] std::io::Error),
}

impl Sink {
    /// Opens the configured log (append mode, created if missing; `-` is
    /// stdout) and starts its writer thread.
    pub fn open(log: &crate::config::AccessLog) -> Result<Sink, OpenError> {
        let target = if log.path.as_os_str() == "-" {
            Target::Stdout
        } else {
            Target::File(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log.path)
                    .map_err(OpenError::File)?,
            )
        };
        let queue = Arc::new(Queue {
            pending: Mutex::default(),
            wake: Condvar::new(),
            limit: log.queue,
        });
        let writer = queue.clone();
        std::thread::Builder::new()
            .name("ktern-access-log".into())
            .spawn(move || write_out(&writer, target))
            .map_err(OpenError::Thread)?;
        Ok(Sink {
            queue: Arc::new(Handle(queue)),
            format: log.format,
        })
    }

    /// Formats `r` and queues it for the writer thread, or drops it (counted
    /// in `dropped`) when the queue holds `access_log.queue` bytes already.
    /// Never waits for I/O: the lock is held for a copy of one line.
    pub fn write(&self, r: &Record<'_>, dropped: &AtomicU64) {
        thread_local! {
            static LINE: RefCell<String> = const { RefCell::new(String::new()) };
        }
        LINE.with_borrow_mut(|line| {
            line.clear();
            match self.format {
                Format::Combined => combined(r, line),
                Format::Json => json(r, line),
            }
            line.push('\n');
            let queue = &self.queue.0;
            let mut p = queue.lock();
            let before = p.bytes.len();
            // An empty queue takes any line, however long: only a backlog
            // drops lines.
            if before > 0 && before + line.len() > queue.limit {
                p.dropped += 1;
                let first = p.dropped == 1;
                drop(p);
                crate::metrics::ShardMetrics::inc(dropped);
                if first {
                    tracing::warn!(
                        queue = queue.limit,
                        "access log: the writer is behind by access_log.queue bytes, dropping lines \
                         (counted in ktern_access_log_dropped_total) until it catches up"
                    );
                }
                return;
            }
            p.bytes.extend_from_slice(line.as_bytes());
            p.lines += 1;
            let batch = BATCH.min(queue.limit / 2);
            let wake = before == 0 || (before < batch && p.bytes.len() >= batch);
            // Under the lock: the writer's subtraction follows its take.
            UNWRITTEN.fetch_add(line.len(), Ordering::Relaxed);
            drop(p);
            // A futex wake per batch, not per line: the writer is asleep
            // only when the queue was empty, or gathering below `batch`.
            if wake {
                queue.wake.notify_one();
            }
        });
    }
}

/// The writer thread: takes what is queued (after gathering for `GATHER`)
/// and writes it with one call; blocking here holds no request.
fn write_out(queue: &Queue, mut target: Target) {
    let mut batch = Vec::new();
    loop {
        let (lines, dropped) = {
            let mut p = queue.lock();
            while p.bytes.is_empty() && !p.closed {
                p = queue.wake.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            if p.bytes.is_empty() {
                return;
            }
            let full = BATCH.min(queue.limit / 2);
            p = queue
                .wake
                .wait_timeout_while(p, GATHER, |p| p.bytes.len() < full && !p.closed)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            std::mem::swap(&mut p.bytes, &mut batch);
            (std::mem::take(&mut p.lines), std::mem::take(&mut p.dropped))
        };
        let res = match &mut target {
            Target::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(&batch).and_then(|()| out.flush())
            }
            Target::File(f) => f.write_all(&batch),
        };
        match res {
            Err(e) => tracing::warn!(error = %e, lines, "access log write failed: lines lost"),
            Ok(()) if dropped > 0 => {
                tracing::warn!(
                    dropped,
                    "access log: the writer caught up after dropping lines"
                );
            }
            Ok(()) => {}
        }
        UNWRITTEN.fetch_sub(batch.len(), Ordering::Relaxed);
        batch.clear();
        batch.shrink_to(KEEP);
    }
}

/// Waits until every queued line is written, or `timeout` passes (a log
/// whose reader has stopped): called before the process exits.
pub fn flush(timeout: Duration) {
    let until = std::time::Instant::now() + timeout;
    while UNWRITTEN.load(Ordering::Relaxed) > 0 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `client - - [time] "request" status bytes "referer" "agent"` (nginx's
/// combined), then `key=value` pairs for what combined lacks.
fn combined(r: &Record<'_>, out: &mut String) {
    let _ = write!(out, "{} - - [", r.client.ip());
    clf_time(r.time, out);
    out.push_str("] \"");
    escape_text(r.method.as_bytes(), out);
    out.push(' ');
    escape_text(r.target.as_bytes(), out);
    let _ = write!(out, " {}\" {} {} \"", r.protocol, r.status, r.bytes_out);
    escape_text(r.referer.unwrap_or(b"-"), out);
    out.push_str("\" \"");
    escape_text(r.user_agent.unwrap_or(b"-"), out);
    out.push_str("\" host=\"");
    escape_text(r.host.as_bytes(), out);
    out.push_str("\" sni=");
    out.push_str(r.tls.sni.as_deref().unwrap_or("-"));
    let _ = write!(
        out,
        " tls={} cipher={} ktls={} in={} out={} upstream=",
        r.tls.version_name(),
        r.tls.cipher_name(),
        u8::from(r.kernel),
        r.bytes_in,
        r.bytes_out
    );
    match r.upstream {
        Some(a) => {
            let _ = write!(out, "{a}");
        }
        None => out.push('-'),
    }
    let _ = write!(out, " rt={:.3} urt=", r.total.as_secs_f64());
    match r.upstream_time {
        Some(t) => {
            let _ = write!(out, "{:.3}", t.as_secs_f64());
        }
        None => out.push('-'),
    }
    // Only on listeners that ask for client certificates.
    if let Some(verify) = r.tls.client_verify() {
        let _ = write!(out, " client_verify={verify}");
        if let Some(id) = &r.tls.client {
            out.push_str(" client_dn=\"");
            escape_text(id.subject.as_bytes(), out);
            let _ = write!(out, "\" client_fp={}", id.fingerprint);
        }
    }
}

/// Bytes outside printable ASCII, `"` and `\` become `\xHH` (as nginx
/// escapes its variables), so a line is always one line.
fn escape_text(bytes: &[u8], out: &mut String) {
    for &b in bytes {
        if (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\' {
            out.push(b as char);
        } else {
            let _ = write!(out, "\\x{b:02X}");
        }
    }
}

fn json(r: &Record<'_>, out: &mut String) {
    let lossy = |b: Option<&[u8]>| b.map(|b| String::from_utf8_lossy(b).into_owned());
    let v = serde_json::json!({
        "time": rfc3339(r.time),
        "client": r.client.ip().to_string(),
        "client_port": r.client.port(),
        "sni": r.tls.sni.as_deref(),
        "tls_version": r.tls.version_name(),
        "cipher": r.tls.cipher_name(),
        "ktls": r.kernel,
        "client_verify": r.tls.client_verify(),
        "client_dn": r.tls.client.as_ref().map(|c| &*c.subject),
        "client_fingerprint": r.tls.client.as_ref().map(|c| &*c.fingerprint),
        "method": r.method,
        "host": r.host,
        "path": r.target,
        "protocol": r.protocol,
        "status": r.status,
        "bytes_in": r.bytes_in,
        "bytes_out": r.bytes_out,
        "referer": lossy(r.referer),
        "user_agent": lossy(r.user_agent),
        "upstream": r.upstream.map(|a| a.to_string()),
        "duration_ms": r.total.as_secs_f64() * 1e3,
        "upstream_ms": r.upstream_time.map(|t| t.as_secs_f64() * 1e3),
    });
    out.push_str(&v.to_string());
}

/// UTC civil date and time from a Unix time (Howard Hinnant's
/// days-from-civil inverse; proleptic Gregorian).
fn civil(t: SystemTime) -> (i64, u32, u32, u32, u32, u32, u32) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    (
        year,
        month,
        day,
        h as u32,
        m as u32,
        s as u32,
        d.subsec_millis(),
    )
}

/// `2026-11-23T10:00:00.123Z`.
fn rfc3339(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s, ms) = civil(t);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
}

/// `23/Nov/2026:10:00:00 +0000` (Common Log Format).
fn clf_time(t: SystemTime, out: &mut String) {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (y, mo, d, h, mi, s, _) = civil(t);
    let _ = write!(
        out,
        "{d:02}/{}/{y:04}:{h:02}:{mi:02}:{s:02} +0000",
        MONTHS[(mo - 1) as usize]
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> TlsInfo {
        TlsInfo {
            sni: Some("app.test".into()),
            version: Some(rustls::ProtocolVersion::TLSv1_3),
            suite: Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
            kernel: true,
            alpn_h2: false,
            resumed: false,
            client_auth: false,
            client: None,
        }
    }

    fn record<'a>(tls: &'a TlsInfo, target: &'a str) -> Record<'a> {
        Record {
            // 2026-11-23T10:20:30.456Z
            time: UNIX_EPOCH + Duration::from_millis(1_795_429_230_456),
            client: "192.0.2.7:5555".parse().unwrap(),
            tls,
            kernel: tls.kernel,
            method: "GET",
            host: "app.test",
            target,
            protocol: "HTTP/1.1",
            status: 200,
            bytes_in: 80,
            bytes_out: 1100,
            referer: None,
            user_agent: Some(b"curl/8 \"x\""),
            upstream: Some("127.0.0.1:9000".parse().unwrap()),
            total: Duration::from_millis(3),
            upstream_time: Some(Duration::from_millis(2)),
        }
    }

    /// A reader that stops reading (a full pipe) never holds the caller:
    /// lines beyond the queue are dropped and counted, the others all
    /// arrive whole once the reader reads again, and none is lost unseen.
    #[test]
    fn a_stalled_reader_drops_counted_lines_and_never_blocks() {
        use std::io::Read as _;
        use std::os::fd::AsRawFd as _;
        let (mut reader, writer) = std::io::pipe().unwrap();
        let log = crate::config::AccessLog {
            path: format!("/proc/self/fd/{}", writer.as_raw_fd()).into(),
            format: Format::Json,
            queue: 4096,
        };
        let sink = Sink::open(&log).unwrap();
        drop(writer);
        let tls = info();
        let dropped = AtomicU64::new(0);
        // ~400-byte lines: 400 KB, six times what a pipe holds.
        const N: u64 = 1000;
        for i in 0..N {
            sink.write(&record(&tls, &format!("/{i}")), &dropped);
        }
        let dropped = dropped.load(Ordering::Relaxed);
        assert!(dropped > N / 2, "only {dropped} of {N} lines dropped");
        // The last handle closes the queue: the writer writes the rest and
        // closes its end, so the read below ends.
        drop(sink);
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        let mut paths = Vec::new();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("a whole line");
            paths.push(v["path"].as_str().unwrap()[1..].parse::<u64>().unwrap());
        }
        assert_eq!(paths.len() as u64 + dropped, N);
        assert!(paths.windows(2).all(|w| w[0] < w[1]), "lines in order");
        assert_eq!(paths[0], 0, "the first lines are kept, later ones dropped");
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn civil_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (leap day), 2024-12-31 23:59:59.
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_735_689_599)),
            "2024-12-31T23:59:59.000Z"
        );
    }

    #[test]
    fn combined_line_has_tls_fields_and_escapes_client_bytes() {
        let tls = info();
        let mut line = String::new();
        combined(&record(&tls, "/a\"b\n"), &mut line);
        assert_eq!(
            line,
            "192.0.2.7 - - [23/Nov/2026:10:20:30 +0000] \"GET /a\\x22b\\x0A HTTP/1.1\" 200 1100 \
             \"-\" \"curl/8 \\x22x\\x22\" host=\"app.test\" sni=app.test tls=TLSv1.3 \
             cipher=TLS13_AES_128_GCM_SHA256 ktls=1 in=80 out=1100 upstream=127.0.0.1:9000 \
             rt=0.003 urt=0.002"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn json_line_parses_back() {
        let tls = info();
        let mut line = String::new();
        json(&record(&tls, "/\u{0}\"}"), &mut line);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["path"], "/\u{0}\"}");
        assert_eq!(v["time"], "2026-11-23T10:20:30.456Z");
        assert_eq!(v["sni"], "app.test");
        assert_eq!(v["tls_version"], "TLSv1.3");
        assert_eq!(v["ktls"], true);
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes_in"], 80);
        assert_eq!(v["upstream"], "127.0.0.1:9000");
        assert_eq!(v["referer"], serde_json::Value::Null);
        assert_eq!(v["client_verify"], serde_json::Value::Null);
    }

    #[test]
    fn client_certificate_fields_appear_where_the_listener_asks_for_one() {
        use crate::handshake::client_auth::ClientIdentity;
        let mut tls = info();
        tls.client_auth = true;
        let mut line = String::new();
        combined(&record(&tls, "/"), &mut line);
        assert!(line.ends_with(" urt=0.002 client_verify=NONE"), "{line}");
        tls.client = Some(Box::new(ClientIdentity {
            subject: "CN=svc \"x\", O=Example".into(),
            common_name: Some("svc".into()),
            sans: "DNS:svc.example".into(),
            fingerprint: "ab".repeat(32).into(),
        }));
        line.clear();
        combined(&record(&tls, "/"), &mut line);
        assert!(
            line.ends_with(&format!(
                " client_verify=SUCCESS client_dn=\"CN=svc \\x22x\\x22, O=Example\" client_fp={}",
                "ab".repeat(32)
            )),
            "{line}"
        );
        line.clear();
        json(&record(&tls, "/"), &mut line);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["client_verify"], "SUCCESS");
        assert_eq!(v["client_dn"], "CN=svc \"x\", O=Example");
        assert_eq!(v["client_fingerprint"], "ab".repeat(32));
    }
}
